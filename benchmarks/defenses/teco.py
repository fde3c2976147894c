"""TeCo: reject inputs whose robustness to image corruptions is inconsistent across corruption types.

Liu, Li, Wang, Hu, Ye, Jin, Wu, Xiao, "Detecting Backdoors During the Inference Stage Based on
Corruption Robustness Consistency" (CVPR 2023). For each ImageNet-C corruption type (Hendrycks &
Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations",
ICLR 2019), the smallest severity 1..5 at which the model's prediction differs from its
prediction on the uncorrupted input (6 if it never does); the score is the standard deviation of
these flip severities across types. A clean input degrades alike under every corruption; a
trigger survives some corruptions far longer than others (high deviation). The paper uses the 15
types at 5 severities (76 forward passes per input) and reports AUROC, with no threshold.

Ours: the corruptions are re-implemented on batched tensors (the ``imagecorruptions`` package
refuses images under 32 pixels, calls scikit-image's removed ``multichannel`` argument and needs
``pkg_resources``), with the severity parameters of Hendrycks' CIFAR-10-C (32x32) generator for
every image size; every random draw comes from the defense's seeded generator. 14 of the 15 types
are present: gaussian, shot and impulse noise, defocus, glass, motion and zoom blur, snow, fog,
brightness, contrast, elastic transform, pixelate and JPEG. Frost is absent (it blends photographs
of frost shipped with ImageNet-C), so the default cost is 1 + 14 x 5 = 71 passes. Approximations:
glass blur displaces pixels by a seeded random offset (a gather) instead of the original's
sequential swaps; motion blur is ImageMagick's one-sided Gaussian line kernel with edge
replication; elastic transform composes the random affine map and the smoothed displacement
field into one bilinear resampling; nothing is quantised to uint8 between steps except for JPEG.
The decision threshold is calibrated on the clean reference at a false-positive rate ``fpr`` (1%
by default, STRIP's FRR): the ``1 - fpr`` quantile of the clean scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_bench.defenses.transforms import jpeg_round_trip
from fire_defense import FireDefenseError

__all__ = ["CORRUPTIONS", "SEVERITIES", "TeCo", "corrupt"]

SEVERITIES = 5
MIN_SIZE = 8  # the blur kernels' reflect padding needs a few pixels of image

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


# --- seeded random draws (on the CPU, from the defense's generator) -----------------------------------------------


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator) * (high - low) + low


def _normal(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator)


# --- filters ----------------------------------------------------------------------------------------------------


def _gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate") -> torch.Tensor:
    """scikit-image's ``gaussian`` per channel (separable, radius ``truncate * sigma``)."""
    radius = min(int(truncate * sigma + 0.5), min(x.shape[-2:]) - 1)
    if radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk, anti-aliased by a 3x3 Gaussian."""
    half = math.ceil(radius) + 1
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    disk = ((taps[:, None] ** 2 + taps[None, :] ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    smooth = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * alias_blur**2))
    smooth = smooth / smooth.sum()
    return F.conv2d(disk[None, None], (smooth[:, None] * smooth[None, :])[None, None], padding=1)[0, 0]


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's motion blur: a one-sided Gaussian average along a line at ``angles`` (degrees, per image)."""
    batch, channels, height, width = x.shape
    taps = torch.arange(2 * radius + 1, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    angles = angles.deg2rad().view(-1, 1, 1)
    rows, columns = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    flat, out = x.flatten(2), torch.zeros_like(x)
    for step, weight in zip(taps.tolist(), weights.tolist(), strict=True):
        r = (rows + torch.ceil(step * angles.sin() - 0.5).long()).clamp(0, height - 1)
        c = (columns + torch.ceil(step * angles.cos() - 0.5).long()).clamp(0, width - 1)
        index = (r * width + c).view(batch, 1, -1).expand(-1, channels, -1).to(x.device)
        out += weight * flat.gather(2, index).view(x.shape)
    return out


def _clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` (bilinear, as SciPy's order-1 ``zoom``), keeping the size."""
    height, width = x.shape[-2:]
    crop_h, crop_w = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    size = (round(crop_h * factor), round(crop_w * factor))
    zoomed = F.interpolate(
        x[..., top : top + crop_h, left : left + crop_w], size=size, mode="bilinear", align_corners=True
    )
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return zoomed[..., top : top + height, left : left + width]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601, as OpenCV's RGB2GRAY) of RGB images; the channel mean otherwise."""
    if x.shape[1] == 3:
        return torch.tensordot(torch.tensor([0.299, 0.587, 0.114]).to(x), x, dims=([0], [1])).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _plasma_fractal(batch: int, size: int, decay: float, generator: torch.Generator) -> torch.Tensor:
    """ImageNet-C's fog heightmap: diamond-square on a ``size`` (a power of two) grid, normalised to [0, 1]."""
    grid = torch.zeros(batch, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(total: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(total.shape, generator=generator, dtype=torch.float64) * 2 - 1
        return total / 4 + wibble * wibble * noise

    while step >= 2:
        half = step // 2
        corners = grid[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        grid[:, half::step, half::step] = wibbled(squares + squares.roll(-1, 2))
        centres = grid[:, half::step, half::step]
        grid[:, ::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        grid[:, half::step, ::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    grid = grid - grid.amin((1, 2), keepdim=True)
    return (grid / grid.amax((1, 2), keepdim=True)).float()


def _box_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """Pillow's BOX downscaling as a matrix: each output pixel averages the input pixels centred in it."""
    owner = ((torch.arange(size_in) + 0.5) * size_out / size_in).floor().long()
    matrix = F.one_hot(owner, size_out).T.float()
    return matrix / matrix.sum(1, keepdim=True)


# --- the corruptions: CIFAR-10-C's parameters, one per severity -------------------------------------------------


def _gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    scale = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    return x + scale * _normal(x.shape, generator).to(x)


def _shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    photons = (500, 250, 100, 75, 50)[severity - 1]
    return torch.poisson((x * photons).cpu(), generator=generator).to(x) / photons


def _impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    flipped = _uniform(x.shape, 0, 1, generator) < amount
    salt = (_uniform(x.shape, 0, 1, generator) < 0.5).float()
    return torch.where(flipped.to(x.device), salt.to(x), x)


def _defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    kernel = _disk(*((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]).to(x)
    radius, channels = kernel.shape[0] // 2, x.shape[1]
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, kernel[None, None].expand(channels, 1, -1, -1), groups=channels)


def _glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma, delta, iterations = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))[severity - 1]
    batch, channels, height, width = x.shape
    rows, columns = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    inside = (rows > delta) & (rows <= height - delta) & (columns > delta) & (columns <= width - delta)
    x = _gaussian_blur(x, sigma)
    for _ in range(iterations):
        dy, dx = torch.randint(-delta, delta, (2, batch, height, width), generator=generator)
        source = torch.where(inside, rows + dy, rows) * width + torch.where(inside, columns + dx, columns)
        index = source.view(batch, 1, -1).expand(-1, channels, -1).to(x.device)
        x = x.flatten(2).gather(2, index).view(x.shape)
    return _gaussian_blur(x, sigma)


def _motion(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[severity - 1]
    return _motion_blur(x, radius, sigma, _uniform((len(x),), -45, 45, generator))


def _zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    zooms = (6, 11, 16, 21, 26)[severity - 1]  # factors 1.00, 1.01, ... (numpy.arange(1, 1.06, 0.01), ...)
    return (x + sum(_clipped_zoom(x, 1 + 0.01 * i) for i in range(zooms))) / (zooms + 1)


def _snow(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    loc, scale, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[severity - 1]
    flakes = _clipped_zoom(loc + scale * _normal((len(x), 1, *x.shape[-2:]), generator).to(x), zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0, 1)
    flakes = _motion_blur(flakes, radius, sigma, _uniform((len(x),), -135, -45, generator))
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


def _fog(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    amount, decay = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1]
    height, width = x.shape[-2:]
    size = 1 << (max(height, width) - 1).bit_length()
    fog = _plasma_fractal(len(x), size, decay, generator)[:, None, :height, :width].to(x)
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + amount * fog) * peak / (peak + amount)


def _brightness(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    lift = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    value = x.amax(1, keepdim=True)  # HSV value; raising it at fixed hue and saturation scales the pixel
    lifted = (value + lift).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp(min=1e-12), lifted)


def _contrast(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    factor = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _elastic_transform(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    batch, _, height, width = x.shape
    size = min(height, width)  # CIFAR-10-C's parameters are fractions of its 32-pixel side
    fractions = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
    alpha, sigma, shift = (size * fraction for fraction in fractions[severity - 1])
    centre, arm = torch.tensor([width // 2, height // 2], dtype=torch.float32), size // 3
    anchors = torch.stack([centre + arm, centre + torch.tensor([arm, -arm]), centre - arm])  # (x, y) points
    moved = anchors + _uniform((batch, 3, 2), -shift, shift, generator)
    # the affine map from an output point back to its source point: solves [moved, 1] @ inverse = anchors
    inverse = torch.linalg.solve(torch.cat([moved, torch.ones(batch, 3, 1)], 2), anchors.expand(batch, 3, 2))
    field = torch.zeros(batch, 2, height, width)
    if alpha > 0:
        field = alpha * _gaussian_blur(_uniform((batch, 2, height, width), -1, 1, generator), sigma, 3.0, "reflect")
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    points = torch.stack([xs + field[:, 0], ys + field[:, 1], torch.ones(batch, height, width)], -1)
    source = points @ inverse[:, None]
    grid = source / torch.tensor([width - 1, height - 1]) * 2 - 1
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="reflection", align_corners=True)


def _pixelate(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    factor = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    height, width = x.shape[-2:]
    rows, columns = _box_matrix(height, int(height * factor)).to(x), _box_matrix(width, int(width * factor)).to(x)
    small = torch.einsum("ih,bchw,jw->bcij", rows, x, columns)
    return F.interpolate(small, size=(height, width), mode="nearest-exact")


def _jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    quality = (80, 65, 58, 50, 40)[severity - 1]  # Pillow's libjpeg, as ImageNet-C
    return jpeg_round_trip(x, quality)


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}
"""ImageNet-C's corruption types in its order, frost excepted, on batches of ``[0, 1]`` images."""


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` (``[0, 1]`` images ``(B, C, H, W)``) under corruption ``name`` at ``severity`` 1..5, in ``[0, 1]``.

    Raises:
        FireDefenseError: an unknown corruption or a severity outside 1..5.
    """
    if name not in CORRUPTIONS:
        raise FireDefenseError(f"teco: unknown corruption {name!r}; use any of {', '.join(CORRUPTIONS)}.")
    if not 1 <= severity <= SEVERITIES:
        raise FireDefenseError(f"teco: severity must be in 1..{SEVERITIES}, got {severity}.")
    return CORRUPTIONS[name](x, severity, generator).clamp(0, 1)


@register_defense
class TeCo(RuntimeDefense):
    """TeCo: deviation across corruption types of the severity that first changes the prediction.

    Args:
        corruptions: The corruption types (names in :data:`CORRUPTIONS`); at least two.
        fpr: Clean false-positive rate at which the threshold is calibrated.
    """

    name = "teco"
    rejects = True
    source = (
        "Liu et al., Detecting Backdoors During the Inference Stage Based on Corruption Robustness "
        "Consistency, CVPR 2023"
    )

    def __init__(self, *, corruptions: Sequence[str] = tuple(CORRUPTIONS), fpr: float = 0.01, **common: int) -> None:
        super().__init__(**common)
        self.corruptions = corruptions
        self.fpr = fpr

    @property
    def forward_passes(self) -> float:
        return float(1 + SEVERITIES * len(self.corruptions))

    def flip_severities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for ``x`` and, per corruption type, the first severity that changes them (6: none)."""
        labels = self._logits(x).argmax(1)
        never = SEVERITIES + 1
        flips = torch.full((len(x), len(self.corruptions)), never, dtype=torch.long, device=x.device)
        for column, name in enumerate(self.corruptions):
            for severity in range(1, SEVERITIES + 1):
                changed = self._logits(corrupt(x, name, severity, self.generator_)).argmax(1) != labels
                flips[:, column] = torch.where(changed & (flips[:, column] == never), severity, flips[:, column])
        return labels, flips

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, flips = self.flip_severities(x)
        return labels, flips.float().std(1, correction=0)

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        unknown = sorted(set(self.corruptions) - set(CORRUPTIONS))
        if unknown or len(self.corruptions) < 2 or not 0 < self.fpr < 1:
            raise FireDefenseError(
                f"teco: corruptions must be two or more of {', '.join(CORRUPTIONS)} "
                f"(unknown: {', '.join(unknown) or 'none'}) and fpr in (0, 1)."
            )
        self._check_images(clean, min_size=MIN_SIZE)
        with torch.inference_mode():
            scores = torch.cat([self._scores(batch)[1] for batch in clean.split(self.batch_size)])
        self.threshold_ = float(scores.quantile(1 - self.fpr, interpolation="higher"))

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x, min_size=MIN_SIZE)
        labels, scores = self._scores(x)
        return self._reject_above(labels, scores, self.threshold_)

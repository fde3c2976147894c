"""ImageNet-C's common corruptions (Hendrycks & Dietterich, ICLR 2019) on batches of ``[0, 1]`` image tensors.

Two parameter sets, chosen by ``parameters``:

- ``"imagenet-c"`` (the default): the 15 types with the severity parameters of the ``imagecorruptions``
  package 1.1.2 (ImageNet-C's, as the package has them), the package TeCo's authors and BackdoorBench's
  ``detection_infer/teco.py`` call. Every type follows the package's code, re-implemented on batched
  tensors (the package refuses images under 32 pixels and fails on current numpy and scikit-image).
- ``"cifar10-c"``: 14 types (no frost) with the parameters of Hendrycks' CIFAR-10-C (32 x 32) generator,
  applied at every size; the set this project used before.

Every output is truncated to uint8 levels (``floor(255 x) / 255``), as the package's ``np.uint8`` cast
does after each corruption (pixelate and JPEG go through Pillow, which rounds); glass blur also
truncates between its steps, and snow rounds its flake layer, as the package does. Every random draw
(noise per pixel; angles, fields, textures and crops per image) comes from the caller's
``torch.Generator``.

Size: the package applies ImageNet-C's pixel-valued parameters unchanged at every size it accepts
(>= 32 pixels), so the authors' CIFAR-10 runs used them at 32 pixels. Ours multiplies each of them
by ``min(H, W) / reference_size`` (default 32: the package's values on 32-pixel images, 0.875 of them on
28-pixel ones; 224 gives ImageNet-C's own scale): defocus radius, glass blur's sigma and
displacement (rounded, at least 1), motion blur's and snow's line radius (rounded) and sigma. The
package's other parameters are already relative to the image and are kept: zoom factors, pixelate
and snow zoom factors, fog's map (the next power of two of the side), elastic transform (sigma and
displacement are fractions of the side), frost (a crop of the texture at the image's size).

Where ours differs from the package: grey images are corrupted as one channel (the package stacks
three copies and draws noise per channel); JPEG encodes grey images as greyscale JPEG; frost uses a
seeded procedural texture instead of the package's photographs (:func:`_frost`). Glass blur moves
pixels sequentially as the package does (:func:`_glass_blur`), on the whole batch at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from fire_bench.defenses.transforms import jpeg_round_trip
from fire_defense import FireDefenseError

__all__ = ["CORRUPTIONS", "PARAMETERS", "SEVERITIES", "ParameterSet", "corrupt", "corruption_names"]

SEVERITIES = 5
ParameterSet = Literal["imagenet-c", "cifar10-c"]
PARAMETERS = get_args(ParameterSet)
MIN_SIZE = 8  # the blur kernels' reflect padding needs a few pixels of image

Corruption = Callable[[torch.Tensor, int, torch.Generator, float], torch.Tensor]


# --- seeded random draws (on the CPU, from the caller's generator) ------------------------------------------------


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(tuple(shape), generator=generator) * (high - low) + low


def _normal(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=generator)


def _truncate(x: torch.Tensor) -> torch.Tensor:
    """``np.uint8(np.clip(255 x, 0, 255)) / 255``: truncation to uint8 levels (1e-3 of a level absorbs float error)."""
    return torch.floor(x.clamp(0, 1) * 255 + 1e-3) / 255


# --- filters ----------------------------------------------------------------------------------------------------


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """``F.pad``, plus ``'symmetric'`` (SciPy's ``reflect``: the edge pixel repeated), at most the image's size."""
    if mode != "symmetric":
        return F.pad(x, pad, mode=mode)
    left, right, top, bottom = (
        min(p, size) for p, size in zip(pad, (x.shape[-1],) * 2 + (x.shape[-2],) * 2, strict=True)
    )
    x = torch.cat([x[..., :left].flip(-1), x, x[..., x.shape[-1] - right :].flip(-1)], -1)
    return torch.cat([x[..., :top, :].flip(-2), x, x[..., x.shape[-2] - bottom :, :].flip(-2)], -2)


def _gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype) -> torch.Tensor:
    taps = torch.arange(-radius, radius + 1, dtype=dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _gaussian_blur(
    x: torch.Tensor, sigma: float | tuple[float, float], truncate: float = 4.0, mode: str = "replicate"
) -> torch.Tensor:
    """scikit-image's ``gaussian`` per channel (separable, radius ``int(truncate * sigma + 0.5)`` per axis)."""
    sigma_y, sigma_x = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    radius_y, radius_x = int(truncate * sigma_y + 0.5), int(truncate * sigma_x + 0.5)
    if mode == "reflect":
        radius_y, radius_x = min(radius_y, x.shape[-2] - 1), min(radius_x, x.shape[-1] - 1)
    channels = x.shape[1]
    if radius_x >= 1:
        kernel = _gaussian_kernel(sigma_x, radius_x, x.dtype).to(x.device).view(1, 1, 1, -1)
        x = F.conv2d(_pad(x, (radius_x, radius_x, 0, 0), mode), kernel.expand(channels, -1, -1, -1), groups=channels)
    if radius_y >= 1:
        kernel = _gaussian_kernel(sigma_y, radius_y, x.dtype).to(x.device).view(1, 1, -1, 1)
        x = F.conv2d(_pad(x, (0, 0, radius_y, radius_y), mode), kernel.expand(channels, -1, -1, -1), groups=channels)
    return x


def _disk(radius: float, alias_blur: float, ksize: int = 3) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk, anti-aliased by a ``ksize`` Gaussian (OpenCV's)."""
    half = math.ceil(radius) + ksize // 2
    taps = torch.arange(-half, half + 1, dtype=torch.float32)
    disk = ((taps[:, None] ** 2 + taps[None, :] ** 2) <= radius**2).float()
    disk = disk / disk.sum()
    smooth = _gaussian_kernel(alias_blur, ksize // 2, torch.float32)
    padded = F.pad(disk[None, None], (ksize // 2,) * 4, mode="reflect")
    return F.conv2d(padded, (smooth[:, None] * smooth[None, :])[None, None])[0, 0]


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor, stop: bool = True) -> torch.Tensor:
    """The package's motion blur: a one-sided Gaussian average along a line at ``angles`` (degrees, per image).

    Edges replicate; with ``stop`` (the package's), taps from the first that leaves the image on are dropped
    and the kernel is not renormalised (long lines darken small images, as in the package).
    """
    batch, channels, height, width = x.shape
    taps = torch.arange(2 * radius + 1, dtype=torch.float32)
    weights = torch.exp(-(taps**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    angles = angles.double().deg2rad().view(-1, 1, 1)
    rows, columns = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    flat, out = x.flatten(2), torch.zeros_like(x)
    inside = torch.ones(batch, 1, 1, dtype=torch.bool)
    for step, weight in zip(taps.tolist(), weights.tolist(), strict=True):
        dy, dx = torch.ceil(step * angles.sin() - 0.5).long(), torch.ceil(step * angles.cos() - 0.5).long()
        if stop:
            inside = inside & (dy.abs() < height) & (dx.abs() < width)
        r, c = (rows + dy).clamp(0, height - 1), (columns + dx).clamp(0, width - 1)
        index = (r * width + c).view(batch, 1, -1).expand(-1, channels, -1).to(x.device)
        out += weight * inside.view(batch, 1, 1, 1).to(x) * flat.gather(2, index).view(x.shape)
    return out


def _clipped_zoom(x: torch.Tensor, factor: float, centre: bool = False) -> torch.Tensor:
    """Zoom into the centre by ``factor`` (bilinear, as SciPy's order-1 ``zoom``).

    The package's (``centre=False``) returns the whole zoomed crop, ``round(ceil(side / factor) * factor)``
    pixels, for the caller to cut ``[:H, :W]``; ImageNet-C's CIFAR-10-C generator (``centre=True``) cuts
    the centre to the input's size.
    """
    height, width = x.shape[-2:]
    crop_h, crop_w = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    size = (round(crop_h * factor), round(crop_w * factor))
    zoomed = F.interpolate(
        x[..., top : top + crop_h, left : left + crop_w], size=size, mode="bilinear", align_corners=True
    )
    if not centre:
        return zoomed
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


def _pixelate_by(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow's BOX resize to ``int(side * factor)``, then NEAREST back (Pillow rounds the small image to uint8)."""
    height, width = x.shape[-2:]
    rows = _box_matrix(height, max(1, int(height * factor))).to(x)
    columns = _box_matrix(width, max(1, int(width * factor))).to(x)
    small = torch.round(torch.einsum("ih,bchw,jw->bcij", rows, x, columns) * 255) / 255
    return F.interpolate(small, size=(height, width), mode="nearest-exact")


def _brightness_by(x: torch.Tensor, lift: float) -> torch.Tensor:
    """HSV value raised by ``lift`` (clipped at 1) at fixed hue and saturation: each pixel scales; grey adds."""
    value = x.amax(1, keepdim=True)
    lifted = (value + lift).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp(min=1e-12), lifted)


def _contrast_by(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _pixels(value: float, scale: float) -> int:
    """A pixel count of ImageNet-C's, scaled to the image: rounded, at least 1."""
    return max(1, round(value * scale))


# --- imagecorruptions 1.1.2's parameters (ImageNet-C's): one entry per severity ------------------------------------


def _gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + sigma * _normal(x.shape, generator).to(x)


def _shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return torch.poisson((x * photons).cpu(), generator=generator).to(x) / photons


def _salt_and_pepper(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """scikit-image's ``random_noise(mode='s&p')``: each value set to 0 or 1 (even odds) with probability ``amount``."""
    flipped = _uniform(x.shape, 0, 1, generator) < amount
    salt = (_uniform(x.shape, 0, 1, generator) < 0.5).float()
    return torch.where(flipped.to(x.device), salt.to(x), x)


def _impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _salt_and_pepper(x, (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1], generator)


def _defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    radius *= scale
    kernel = _disk(radius, alias_blur, 3 if radius <= 8 else 5).to(x)
    half = min(kernel.shape[0] // 2, min(x.shape[-2:]) - 1)  # OpenCV's filter2D: reflect-101 borders
    cut = kernel.shape[0] // 2 - half  # a kernel wider than the image is cut to it (never at 32 / 28 px)
    kernel = kernel[cut : kernel.shape[0] - cut, cut : kernel.shape[1] - cut]
    channels = x.shape[1]
    kernel = (kernel / kernel.sum())[None, None].expand(channels, 1, -1, -1)
    return F.conv2d(F.pad(x, (half,) * 4, mode="reflect"), kernel, groups=channels)


def _glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    sigma, delta = sigma * scale, _pixels(delta, scale)
    batch, channels, height, width = x.shape
    x = _truncate(_gaussian_blur(x, sigma))
    # the package's local shuffle: for h = H - delta .. delta + 1 and w = W - delta .. delta + 1 (descending),
    # dx, dy drawn in [-delta, delta), ``x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]``; on its
    # (H, W, 3) arrays the right side holds views, so this copies pixel (h + dy, w + dx) into (h, w) and
    # leaves the other as it was (not a swap). Ours does the same on pixel indices, then gathers once.
    index = torch.arange(height * width).repeat(batch, 1)
    images = torch.arange(batch)
    positions = [(h, w) for h in range(height - delta, delta, -1) for w in range(width - delta, delta, -1)]
    for _ in range(iterations):
        offsets = torch.randint(-delta, delta, (len(positions), 2, batch), generator=generator)
        for (h, w), (dx, dy) in zip(positions, offsets, strict=True):
            index[:, h * width + w] = index[images, (h + dy) * width + (w + dx)]
    x = x.flatten(2).gather(2, index.view(batch, 1, -1).expand(-1, channels, -1).to(x.device)).view(x.shape)
    return _gaussian_blur(x, sigma)


def _motion(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    return _motion_blur(x, _pixels(radius, scale), sigma * scale, _uniform((len(x),), -45, 45, generator))


# (step, count): the package's numpy.arange(1, 1.11, 0.01), ... (float rounding gives the first 12 factors)
_ZOOMS = ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11))


def _zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    step, count = _ZOOMS[severity - 1]
    height, width = x.shape[-2:]
    out = sum(_clipped_zoom(x, 1 + step * i)[..., :height, :width] for i in range(count))
    return (x + out) / (count + 1)


def _snow(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    loc, spread, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    height, width = x.shape[-2:]
    flakes = _clipped_zoom(loc + spread * _normal((len(x), 1, height, width), generator).to(x), zoom)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0, 1)
    angles = _uniform((len(x),), -135, -45, generator)
    flakes = _motion_blur(flakes, _pixels(radius, scale), sigma * scale, angles)  # on the whole zoomed layer
    flakes = (torch.round(flakes * 255) / 255)[..., :height, :width]
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


# One frost photograph's statistics per profile, measured on 28-pixel crops of the five photographs the
# package draws from (frost1-5, resized by 1.1 as it does): per-channel (RGB) mean and within-crop standard
# deviation, on 0..255. The photographs themselves are not shipped.
_FROST_PROFILES = (
    ((77.0, 149.1, 166.0), (15.5, 9.5, 8.9)),
    ((200.7, 205.3, 214.7), (13.6, 13.7, 13.8)),
    ((199.3, 203.8, 213.0), (14.2, 14.3, 14.4)),
    ((138.1, 153.3, 165.7), (19.7, 19.7, 20.5)),
    ((109.8, 120.9, 132.4), (29.3, 29.0, 28.5)),
)


def _frost_texture(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A seeded stand-in for the package's frost crops, on ``[0, 1]``, shaped like ``x``.

    Per image: a profile drawn uniformly from :data:`_FROST_PROFILES` (the package draws one of five
    photographs), and a diamond-square fractal (decay 1.5: rougher than fog) on a grid twice the
    image's side, cropped at a random place to the image's size, standardised, and given the
    profile's channel means and standard deviations. Grey images get the profile's luma.
    """
    batch, channels, height, width = x.shape
    size = 1 << (2 * max(height, width) - 1).bit_length()
    texture = _plasma_fractal(batch, size, 1.5, generator)
    tops = torch.randint(0, size - height + 1, (batch, 1, 1), generator=generator)
    lefts = torch.randint(0, size - width + 1, (batch, 1, 1), generator=generator)
    rows, columns = tops + torch.arange(height).view(1, -1, 1), lefts + torch.arange(width).view(1, 1, -1)
    crops = texture[torch.arange(batch).view(-1, 1, 1), rows, columns]
    crops = (crops - crops.mean((1, 2), keepdim=True)) / crops.std((1, 2), keepdim=True).clamp(min=1e-6)
    profiles = torch.tensor(_FROST_PROFILES) / 255  # (5, 2, 3)
    chosen = profiles[torch.randint(0, len(profiles), (batch,), generator=generator)]
    mean, std = chosen[:, 0], chosen[:, 1]  # (batch, 3)
    if channels != 3:
        luma = torch.tensor([0.2989, 0.5870, 0.1140])  # the package's rgb2gray for grey frost
        mean, std = (mean @ luma)[:, None].expand(-1, channels), (std @ luma)[:, None].expand(-1, channels)
    return (mean[:, :, None, None] + std[:, :, None, None] * crops[:, None]).clamp(0, 1).to(x)


def _frost(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """The package's ``c0 x + c1 frost`` (clipped) with :func:`_frost_texture` for its photographs."""
    image, frost = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    return image * x + frost * _frost_texture(x, generator)


def _fog(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    amount, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    return _fog_by(x, amount, decay, generator)


def _fog_by(x: torch.Tensor, amount: float, decay: float, generator: torch.Generator) -> torch.Tensor:
    height, width = x.shape[-2:]
    size = 1 << (max(height, width) - 1).bit_length()
    fog = _plasma_fractal(len(x), size, decay, generator)[:, None, :height, :width].to(x)
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + amount * fog) * peak / (peak + amount)


def _brightness(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _brightness_by(x, (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1])


def _contrast(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _contrast_by(x, (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1])


def _elastic_transform(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """The package's elastic transform (not ImageNet-C's: no affine part), sizes relative to the image."""
    batch, _, height, width = x.shape
    alpha = 250 * (0.05, 0.065, 0.085, 0.1, 0.12)[severity - 1]
    sigma, limit = (height * 0.01, width * 0.01), height * 0.005  # the package uses the height for both limits
    field = _uniform((batch, 2, height, width), -limit, limit, generator)  # (dx, dy)
    field = alpha * _gaussian_blur(field, sigma, 3.0, "symmetric")
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    # SciPy's map_coordinates(order=1, mode='reflect'): bilinear, half-sample symmetric borders
    source_x, source_y = xs + field[:, 0], ys + field[:, 1]
    grid = torch.stack([(2 * source_x + 1) / width - 1, (2 * source_y + 1) / height - 1], -1)
    return F.grid_sample(x, grid.to(x), mode="bilinear", padding_mode="reflection", align_corners=False)


def _pixelate(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _pixelate_by(x, (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1])


def _jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return jpeg_round_trip(x, (25, 18, 15, 10, 7)[severity - 1])  # Pillow's libjpeg, as the package


IMAGENET_C: dict[str, Corruption] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


# --- CIFAR-10-C's parameters (Hendrycks' 32 x 32 generator), applied at every size -------------------------------


def _c10_gaussian_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return x + (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1] * _normal(x.shape, generator).to(x)


def _c10_shot_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    photons = (500, 250, 100, 75, 50)[severity - 1]
    return torch.poisson((x * photons).cpu(), generator=generator).to(x) / photons


def _c10_impulse_noise(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _salt_and_pepper(x, (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1], generator)


def _c10_defocus_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    kernel = _disk(*((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))[severity - 1]).to(x)
    radius, channels = kernel.shape[0] // 2, x.shape[1]
    padded = F.pad(x, (radius,) * 4, mode="reflect")
    return F.conv2d(padded, kernel[None, None].expand(channels, 1, -1, -1), groups=channels)


def _c10_glass_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """CIFAR-10-C's levels; pixels displaced by a seeded random offset (a gather), not sequential swaps."""
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


def _c10_motion(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    radius, sigma = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))[severity - 1]
    return _motion_blur(x, radius, sigma, _uniform((len(x),), -45, 45, generator), stop=False)


def _c10_zoom_blur(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    zooms = (6, 11, 16, 21, 26)[severity - 1]  # factors 1.00, 1.01, ... (numpy.arange(1, 1.06, 0.01), ...)
    return (x + sum(_clipped_zoom(x, 1 + 0.01 * i, centre=True) for i in range(zooms))) / (zooms + 1)


def _c10_snow(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    loc, spread, zoom, threshold, radius, sigma, blend = (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[severity - 1]
    flakes = _clipped_zoom(loc + spread * _normal((len(x), 1, *x.shape[-2:]), generator).to(x), zoom, centre=True)
    flakes = torch.where(flakes < threshold, 0.0, flakes).clamp(0, 1)
    flakes = _motion_blur(flakes, radius, sigma, _uniform((len(x),), -135, -45, generator), stop=False)
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


def _c10_fog(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _fog_by(x, *((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))[severity - 1], generator)


def _c10_brightness(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _brightness_by(x, (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1])


def _c10_contrast(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _contrast_by(x, (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1])


def _c10_elastic_transform(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    """CIFAR-10-C's random affine map and smoothed displacement field, composed into one bilinear resampling."""
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


def _c10_pixelate(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return _pixelate_by(x, (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1])


def _c10_jpeg_compression(x: torch.Tensor, severity: int, generator: torch.Generator, scale: float) -> torch.Tensor:
    return jpeg_round_trip(x, (80, 65, 58, 50, 40)[severity - 1])


CIFAR10_C: dict[str, Corruption] = {
    "gaussian_noise": _c10_gaussian_noise,
    "shot_noise": _c10_shot_noise,
    "impulse_noise": _c10_impulse_noise,
    "defocus_blur": _c10_defocus_blur,
    "glass_blur": _c10_glass_blur,
    "motion_blur": _c10_motion,
    "zoom_blur": _c10_zoom_blur,
    "snow": _c10_snow,
    "fog": _c10_fog,
    "brightness": _c10_brightness,
    "contrast": _c10_contrast,
    "elastic_transform": _c10_elastic_transform,
    "pixelate": _c10_pixelate,
    "jpeg_compression": _c10_jpeg_compression,
}

_TABLES = {"imagenet-c": IMAGENET_C, "cifar10-c": CIFAR10_C}

CORRUPTIONS: tuple[str, ...] = tuple(IMAGENET_C)
"""ImageNet-C's 15 corruption types, in its order (``"cifar10-c"`` has all but frost)."""


def corruption_names(parameters: str = "imagenet-c") -> tuple[str, ...]:
    """The corruption types of a parameter set (:data:`PARAMETERS`), in ImageNet-C's order.

    Raises:
        FireDefenseError: an unknown parameter set.
    """
    if parameters not in _TABLES:
        raise FireDefenseError(f"unknown corruption parameters {parameters!r}; use one of {', '.join(PARAMETERS)}.")
    return tuple(_TABLES[parameters])


def corrupt(
    x: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator,
    *,
    parameters: str = "imagenet-c",
    reference_size: int = 32,
) -> torch.Tensor:
    """``x`` (``[0, 1]`` images ``(B, C, H, W)``) under corruption ``name`` at ``severity`` 1..5, on uint8 levels.

    ``reference_size``: the side at which ImageNet-C's pixel-valued parameters apply unscaled (module
    docstring); ignored by ``"cifar10-c"``.

    Raises:
        FireDefenseError: an unknown corruption or parameter set, a severity outside 1..5, or a
            ``reference_size`` below 1.
    """
    names = corruption_names(parameters)
    if name not in names:
        raise FireDefenseError(f"unknown corruption {name!r} in {parameters!r}; use any of {', '.join(names)}.")
    if not 1 <= severity <= SEVERITIES:
        raise FireDefenseError(f"corruption severity must be in 1..{SEVERITIES}, got {severity}.")
    if reference_size < 1:
        raise FireDefenseError(f"reference_size must be a positive side in pixels, got {reference_size}.")
    scale = min(x.shape[-2:]) / reference_size
    return _truncate(_TABLES[parameters][name](x, severity, generator, scale))

"""SentiNet: reject inputs whose salient region fools clean images without being a mere occlusion.

Chou, Tramèr, Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep Learning
Systems" (IEEE S&P Workshops 2020). For every input: Grad-CAM (Selvaraju et al., ICCV 2017) of the
predicted class gives a mask, the pixels whose normalised heat is at least ``mask_threshold``. The
masked region of the input is pasted onto ``n_samples`` held-out clean images: the *fooled rate*
is the share of them the model then assigns the input's predicted label. An *inert pattern*
(uniform noise) with the same mask gives the *average confidence* (mean top-class softmax) of the
model on the same images, which tells a region that fools because it is a trigger from one that
fools because it covers the image. On clean inputs the points (average confidence, fooled rate)
lie under a boundary, which the paper approximates from clean inputs: in each interval of the
confidence the highest fooled rates, fitted by a quadratic in least squares. Triggered inputs lie
above it. Cost per input: 1 + 2 ``n_samples`` forward passes (Grad-CAM's forward, whose prediction
is the label, then the pasted images and the inert images) and one backward pass (Grad-CAM's).

Reference compared with: BackdoorBench's ``detection_infer/sentinet.py`` (commit f02e353, adapted
from the Beatrix authors' ``defenses/SentiNet/SentiNet.py``, whose ``DecisionBoundary`` is the
paper's boundary) and its ``config/detection/sentinet`` defaults: ``clean_sample_num`` = 100 clean
images, ``mask_cond`` = 0.85, Grad-CAM (``pytorch_grad_cam``) of the predicted class, uniform noise
in [0, 255] as the inert pattern. Ours keeps those defaults and differs in these ways:

- Decision: BackdoorBench computes the fooled rate but rejects on the average confidence alone,
  ``avgconf > 0.9``; its code fits no boundary. Ours fits the paper's boundary on the defender's
  clean reference (Beatrix's construction: intervals of width ``bin_width`` = 0.04 of the
  confidence, the ``per_bin`` = 2 highest fooled rates in each, a least-squares quadratic through
  them; a lower degree if fewer than three distinct confidences remain) and scores an input by
  its signed Euclidean distance to that curve over confidences in [0, 1] (positive above it). The
  paper's cut, a distance above the mean squared distance of the boundary points over the curve,
  is replaced by our detectors' rule: the threshold is calibrated on the clean reference's scores
  at ``fpr`` (:func:`~fire_bench.defenses.base.calibrate_threshold`). ``statistic="confidence"`` scores
  by the average confidence alone (BackdoorBench's statistic); with ``threshold=0.9`` it is
  BackdoorBench's fixed rule (``score >= 0.9``, theirs ``> 0.9``: equal only on a tie).
- The inert pattern: BackdoorBench (and Beatrix) keep the input's region and fill the rest of the
  image with noise, so the confidence measures the region on its own (``inert="isolate"``). Ours
  pastes the noise in the mask's place on the clean images, so that the confidence measures what
  is left of them once the region is covered (``inert="occlude"``, the default: our reading of
  the paper's description, whose full text we could not check here).
  Its boundary needs it: with ``"isolate"`` a model that is confident on noise puts every clean
  input at a confidence near 1 (the tests' tiny model; the Fashion-MNIST blended record), the
  boundary collapses to one interval and cannot separate.
- Clean images: BackdoorBench draws 10 per class, with replacement, from the clean test split
  (by true label), and inspects other test images. Ours draws ``n_samples`` from the defender's
  clean reference at random (seeded, without replacement, no labels needed); the boundary and the
  threshold are fitted on the rest of the reference, so no image is pasted onto itself.
- Grad-CAM: ours is Februus's (:func:`fire_bench.defenses.gradcam.grad_cam`), the same
  computation (gradient-weighted channel sum, ReLU, bilinear resize) rescaled by
  ``(heat - min) / (max - min)`` per image, ``pytorch_grad_cam``'s min-max scaling; the mask is
  ``heat >= mask_threshold`` as theirs. Its layer is ``layer`` (default: the last stage output,
  ``layer4`` of a PreAct-ResNet); BackdoorBench's default is ``layer4.1.conv2``, the last
  convolution before the final residual addition (``layer="layer4.1.conv2"``). On the embedded
  default's width-8 PreAct-ResNet-18 (Fashion-MNIST) both 4 x 4 maps miss BadNets' corner patch;
  ``layer="1.layer3"`` (7 x 7) finds it (``docs/defenses.md``, "SentiNet").
- Pixels: BackdoorBench pastes uint8 images and draws a fresh unseeded noise image per pasted
  image; ours pastes ``[0, 1]`` tensors and draws the noise per pasted image from the defense's
  seeded generator.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, fixed_or_calibrated, register_defense
from fire_bench.defenses.gradcam import grad_cam
from fire_defense import FireDefenseError
from fire_defense.checks import is_finite_number, is_integer

__all__ = ["SentiNet"]

_CHUNK = 1024  # pasted images made at once (memory); the model sees pass_batch of them per pass
_CURVE_POINTS = 2001  # samples of the boundary over confidences in [0, 1] for the distance
Inert = Literal["occlude", "isolate"]
Statistic = Literal["boundary", "confidence"]
INERTS, STATISTICS = get_args(Inert), get_args(Statistic)


def _boundary_points(confidence: np.ndarray, fooled: np.ndarray, width: float, per_bin: int) -> np.ndarray:
    """The paper's boundary samples: in each interval ``(i w, (i + 1) w]`` the ``per_bin`` highest fooled rates."""
    points = []
    for i in range(int(1 / width) + 1):
        inside = np.nonzero((confidence > i * width) & (confidence <= (i + 1) * width))[0]
        top = inside[np.argsort(fooled[inside], kind="stable")[-per_bin:]]
        points.extend((confidence[j], fooled[j]) for j in top)
    return np.array(points, dtype=np.float64).reshape(-1, 2)


def _fit_curve(points: np.ndarray) -> np.ndarray:
    """Least-squares polynomial through ``points`` (``numpy.polyfit`` order): quadratic, lower with fewer x values."""
    degree = min(2, len(np.unique(points[:, 0])) - 1)
    return np.polyfit(points[:, 0], points[:, 1], degree)


@register_defense
class SentiNet(RuntimeDefense):
    """SentiNet: signed distance of (inert confidence, fooled rate) above a boundary fitted on clean inputs.

    Args:
        n_samples: Held-out clean images each input's region is pasted onto (BackdoorBench's
            ``clean_sample_num``); they are drawn from the clean reference, the rest fits the boundary.
        mask_threshold: Grad-CAM heat (min-max scaled to [0, 1] per image) at or above which a pixel
            is in the region (BackdoorBench's ``mask_cond``).
        layer: The layer for Grad-CAM (a convolutional map, or a transformer block's tokens): a name, ``'last'``
            for the last stage output, or an integer, the stage's position (``2``: the third stage).
        inert: ``"occlude"``: noise in the region's place on each clean image (the paper's description);
            ``"isolate"``: the inert image is the input's region on noise (BackdoorBench).
        statistic: ``"boundary"``: signed distance above the boundary fitted on clean inputs (the paper);
            ``"confidence"``: the average inert confidence alone (BackdoorBench's statistic).
        bin_width: Width of the confidence intervals the boundary is sampled in.
        per_bin: Highest fooled rates kept per interval as boundary points.
        threshold: A fixed threshold (scores ``>= threshold`` are rejected; BackdoorBench: 0.9 with
            ``statistic="confidence"``); ``None``: calibrated at ``fpr``.
        fpr: Clean false-positive rate at which the threshold is calibrated.
    """

    name = "sentinet"
    rejects = True
    source = (
        "Chou, Tramèr, Pellegrino, SentiNet: Detecting Localized Universal Attacks Against Deep Learning "
        "Systems, IEEE S&P Workshops 2020"
    )

    def __init__(
        self,
        *,
        n_samples: int = 100,
        mask_threshold: float = 0.85,
        layer: str | int = "last",
        inert: Inert = "occlude",
        statistic: Statistic = "boundary",
        bin_width: float = 0.04,
        per_bin: int = 2,
        threshold: float | None = None,
        fpr: float = 0.01,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.n_samples = n_samples
        self.mask_threshold = mask_threshold
        self.layer = layer
        self.inert = inert
        self.statistic = statistic
        self.bin_width = bin_width
        self.per_bin = per_bin
        self.threshold = threshold
        self.fpr = fpr

    @property
    def forward_passes(self) -> float:
        return float(1 + 2 * self.n_samples)  # Grad-CAM's pass (the label), the pasted and the inert images

    def _check_params(self) -> None:
        if not is_integer(self.n_samples) or self.n_samples < 1 or not is_integer(self.per_bin) or self.per_bin < 1:
            raise FireDefenseError(
                f"sentinet: n_samples and per_bin must be whole numbers >= 1, got {self.n_samples!r} and "
                f"{self.per_bin!r}; pass e.g. n_samples=100, per_bin=2."
            )
        if not is_finite_number(self.mask_threshold) or not 0 < self.mask_threshold <= 1:
            raise FireDefenseError(
                f"sentinet: mask_threshold must be in (0, 1], got {self.mask_threshold!r}; pass e.g. 0.85."
            )
        if not is_finite_number(self.bin_width) or not 0 < self.bin_width <= 1:
            raise FireDefenseError(f"sentinet: bin_width must be in (0, 1], got {self.bin_width!r}; pass e.g. 0.04.")
        if not is_finite_number(self.fpr) or not 0 < self.fpr < 1:
            raise FireDefenseError(f"sentinet: fpr must be in (0, 1), got {self.fpr!r}; pass e.g. 0.01.")
        if self.threshold is not None and not is_finite_number(self.threshold):
            raise FireDefenseError(
                f"sentinet: threshold must be a number or None (calibrated), got {self.threshold!r}."
            )
        if self.inert not in INERTS or self.statistic not in STATISTICS:
            raise FireDefenseError(
                f"sentinet: inert must be one of {', '.join(INERTS)} and statistic one of {', '.join(STATISTICS)}, "
                f"got {self.inert!r} and {self.statistic!r}."
            )

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each input's region, ``(N, 1, H, W)`` of 0 / 1, from Grad-CAM of its predicted class; the predictions."""
        heat, predicted = grad_cam(self.model_, self.layer_, x, self.name)
        low = heat.flatten(1).amin(1)[:, None, None]
        heat = (heat - low) / (1 - low).clamp_min(1e-7)  # pytorch_grad_cam's min-max scaling (the peak is 1)
        return (heat >= self.mask_threshold).to(x.dtype)[:, None], predicted

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's labels for ``x``, the fooled rates and the average inert confidences (each in [0, 1])."""
        masks, labels = self.masks(x)
        overlays = self.overlays_[None]
        per_chunk = max(1, _CHUNK // self.n_samples)
        fooled, confidence = [], []
        for start in range(0, len(x), per_chunk):
            part = slice(start, start + per_chunk)
            inputs, mask = x[part, None], masks[part, None]
            pasted = (inputs * mask + overlays * (1 - mask)).flatten(0, 1)
            hits = self._logits(pasted).argmax(1).view(len(inputs), -1) == labels[part, None]
            noise = torch.rand((len(inputs), *self.overlays_.shape), generator=self.generator_)
            noise = noise.to(x.device, x.dtype)
            if self.inert == "isolate":
                inert = inputs * mask + noise * (1 - mask)
            else:
                inert = overlays * (1 - mask) + noise * mask
            top = self._logits(inert.flatten(0, 1)).float().softmax(1).amax(1).view(len(inputs), -1)
            fooled.append(hits.float().mean(1))
            confidence.append(top.mean(1))
        return labels, torch.cat(fooled), torch.cat(confidence)

    def _scores(self, fooled: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        if self.statistic == "confidence":
            return confidence
        points = torch.stack([confidence, fooled], 1).double()
        distance = torch.cdist(points, self.curve_.to(points.device)).amin(1)
        height = torch.from_numpy(np.polyval(self.coefficients_, confidence.double().cpu().numpy()))
        above = fooled.double().cpu() > height
        return torch.where(above, distance.cpu(), -distance.cpu()).float().to(fooled.device)

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        self._check_params()
        self._check_images(clean)
        if len(clean) < self.n_samples + 3:
            raise FireDefenseError(
                f"sentinet: {self.n_samples} held-out images and at least 3 to fit the boundary need "
                f"{self.n_samples + 3} clean images, got {len(clean)}; pass more clean data or a smaller n_samples."
            )
        self.layer_ = self._layer(self.layer)
        order = torch.randperm(len(clean), generator=self.generator_).to(clean.device)
        self.overlays_ = clean[order[: self.n_samples]]
        fitting = clean[order[self.n_samples :]]
        with torch.inference_mode():
            parts = [self.statistics(batch)[1:] for batch in fitting.split(self.batch_size)]
        fooled = torch.cat([part[0] for part in parts])
        confidence = torch.cat([part[1] for part in parts])
        self.boundary_points_ = _boundary_points(
            confidence.double().cpu().numpy(), fooled.double().cpu().numpy(), self.bin_width, self.per_bin
        )
        self.coefficients_ = _fit_curve(self.boundary_points_)
        grid = np.linspace(0.0, 1.0, _CURVE_POINTS)
        self.curve_ = torch.from_numpy(np.stack([grid, np.polyval(self.coefficients_, grid)], 1))
        self.fit_scores_ = self._scores(fooled, confidence)  # the clean reference's, the threshold's basis
        self.threshold_ = fixed_or_calibrated(self.threshold, self.fit_scores_, self.fpr)

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x, like=self.overlays_)
        labels, fooled, confidence = self.statistics(x)
        return self._reject_above(labels, self._scores(fooled, confidence), self.threshold_)

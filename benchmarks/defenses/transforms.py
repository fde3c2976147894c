"""Input-transform defenses: purify every input with a fixed image transform, then classify it (one pass).

A transform that destroys a trigger's exact pixels while keeping the image's class evidence
mitigates the backdoor; the price is some clean accuracy. Sources:

- JPEG re-compression: Dziugaite, Ghahramani, Roy, "A study of the effect of JPG compression on
  adversarial images" (2016); quality 75 as Guo et al., "Countering Adversarial Images using Input
  Transformations" (ICLR 2018).
- Median filter and bit-depth reduction: Xu, Evans, Qi, "Feature Squeezing" (NDSS 2018), whose
  CIFAR-10 settings are a 2x2 median window and 5-bit colour depth.
- Gaussian blur: the smoothing baseline used against patch triggers, e.g. in Qiu et al.,
  "DeepSweep" (AsiaCCS 2021); a 3x3 kernel, sigma 1.
"""

from __future__ import annotations

import io
from abc import abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fire_adapters.preprocess import to_tensor, to_uint8
from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_defense import FireDefenseError

__all__ = [
    "BitDepthReduction",
    "GaussianBlur",
    "InputTransformDefense",
    "JpegCompression",
    "MedianFilter",
    "jpeg_round_trip",
]


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """``[0, 1]`` images ``(N, C, H, W)`` rounded to uint8, JPEG-encoded at ``quality`` by Pillow and decoded."""
    decoded = []
    for image in to_uint8(x):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(buffer)).reshape(image.shape))
    return to_tensor(np.stack(decoded), x.device, x.dtype)


class InputTransformDefense(RuntimeDefense):
    """Classify ``transform(x)`` instead of ``x``: one forward pass; nothing is learned from data."""

    @property
    def forward_passes(self) -> float:
        return 1.0

    @abstractmethod
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The purified batch, ``[0, 1]`` images of the same shape."""

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        self.transform(clean[:1])  # reject bad hyperparameters now, not at the first prediction

    def _decide(self, x: torch.Tensor) -> Decision:
        return Decision(self._logits(self.transform(x)).argmax(1), None)


@register_defense
class JpegCompression(InputTransformDefense):
    """JPEG-encode and decode every input at ``quality`` (1-100)."""

    name = "jpeg"
    source = "Dziugaite et al. 2016; quality 75 as Guo et al., ICLR 2018"

    def __init__(self, *, quality: int = 75, **common: int) -> None:
        super().__init__(**common)
        self.quality = quality

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= self.quality <= 100:
            raise FireDefenseError(f"jpeg: quality must be in 1..100, got {self.quality}.")
        return jpeg_round_trip(x, self.quality)


@register_defense
class GaussianBlur(InputTransformDefense):
    """Blur every input with a ``kernel_size`` Gaussian of standard deviation ``sigma``."""

    name = "blur"
    source = "Gaussian smoothing baseline, e.g. Qiu et al., DeepSweep, AsiaCCS 2021"

    def __init__(self, *, kernel_size: int = 3, sigma: float = 1.0, **common: int) -> None:
        super().__init__(**common)
        self.kernel_size = kernel_size
        self.sigma = sigma

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.sigma <= 0:
            raise FireDefenseError("blur: kernel_size must be odd and positive, and sigma positive.")
        return TF.gaussian_blur(x, [self.kernel_size, self.kernel_size], [self.sigma, self.sigma])


@register_defense
class MedianFilter(InputTransformDefense):
    """Replace each pixel by the median of its ``window x window`` neighbourhood (per channel).

    An even window is anchored as SciPy's ``median_filter`` (Feature Squeezing's implementation): the
    extra row and column lie before the pixel; borders are reflected.
    """

    name = "median"
    source = "Xu, Evans, Qi, Feature Squeezing, NDSS 2018 (2x2 median for CIFAR-10)"

    def __init__(self, *, window: int = 2, **common: int) -> None:
        super().__init__(**common)
        self.window = window

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.window < 1 or self.window > min(x.shape[-2:]):
            raise FireDefenseError(f"median: window must be in 1..{min(x.shape[-2:])}, got {self.window}.")
        after = (self.window - 1) // 2
        before = self.window - 1 - after
        padded = F.pad(x, (before, after, before, after), mode="reflect") if self.window > 1 else x
        patches = padded.unfold(-2, self.window, 1).unfold(-2, self.window, 1)
        flat = patches.reshape(*patches.shape[:-2], -1)
        # torch.median takes the lower middle value; SciPy's even-window median does the same
        return flat.median(dim=-1).values


@register_defense
class BitDepthReduction(InputTransformDefense):
    """Quantise every colour channel to ``bits`` bits."""

    name = "bitdepth"
    source = "Xu, Evans, Qi, Feature Squeezing, NDSS 2018 (5 bits for CIFAR-10)"

    def __init__(self, *, bits: int = 5, **common: int) -> None:
        super().__init__(**common)
        self.bits = bits

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if not 1 <= self.bits <= 8:
            raise FireDefenseError(f"bitdepth: bits must be in 1..8, got {self.bits}.")
        levels = 2**self.bits - 1
        return (x * levels).round() / levels

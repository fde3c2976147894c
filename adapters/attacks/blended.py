"""Blended: the image blended with a fixed pattern, ``(1 - alpha) * x + alpha * pattern``.

Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning"
(arXiv 1712.05526, 2017), whose patterns include a cartoon image and random noise. BackdoorBench
blends a cartoon image with alpha 0.2 for training and test (``config/attack/blended``). We ship no
image file: our pattern is a smooth random image drawn from ``pattern_seed`` (8 x 8 uniform noise
per channel, upsampled bicubically and stretched to 0..255), which, like a cartoon, has large
smooth regions. (Pixel-wise white noise is harsher on small grey images: on Fashion-MNIST a model
backdoored with one white-noise pattern sent 100% of images blended with *another* white-noise
pattern to the target, so the trigger there is noise itself, not a pattern.) As in BackdoorBench,
the blend is computed in float and truncated to uint8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fire_adapters.attacks.base import Attack, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_adapters.preprocess import to_uint8
from fire_defense import FireDefenseError

__all__ = ["Blended"]


@register_attack
class Blended(Attack):
    """Blend every poisoned image with one random-noise pattern at weight ``alpha``."""

    name = "blended"

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        alpha: float = 0.2,
        pattern_seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.alpha = alpha
        self.pattern_seed = pattern_seed
        if not 0 < alpha <= 1:
            raise FireDefenseError(f"alpha must be in (0, 1], got {alpha}.")

    @property
    def pattern(self) -> np.ndarray:
        """The blend pattern, uint8 ``(H, W, C)``: a smooth random image."""
        height, width, channels = self.dataset.img_size
        coarse = torch.from_numpy(np.random.default_rng(self.pattern_seed).random((1, channels, 8, 8)))
        smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0]
        low, high = smooth.amin(dim=(1, 2), keepdim=True), smooth.amax(dim=(1, 2), keepdim=True)
        smooth = (smooth - low) / (high - low)
        return to_uint8(smooth[None])[0]

    def apply(self, images: np.ndarray) -> np.ndarray:
        blended = (1 - self.alpha) * images.astype(np.float32) + self.alpha * self.pattern.astype(np.float32)
        return np.clip(blended, 0, 255).astype(np.uint8)

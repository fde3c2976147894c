"""BppAttack: the image's own colour-depth reduction is the trigger; trained with negative samples.

Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning" (CVPR 2022). Each channel is quantised to
``squeeze_num`` levels (``round(x / 255 * (q - 1)) / (q - 1) * 255``), so the change differs from
one image to the next and is hard to see. In training, ``neg_ratio`` of every batch are *negative*
samples: clean images plus the quantisation residual of another image, with their true labels, so
the model learns the image's own quantisation rather than any similar noise. Defaults follow
BackdoorBench (``config/attack/bpp``: squeeze_num 8, no dithering, neg_ratio 0.1); differences:
the poisoned training samples are a fixed 10% drawn once (BackdoorBench quantises the first 10% of
every shuffled batch), negative residuals come from batch-mates rather than random training
images, and the paper's adversarial variant of negative samples and Floyd-Steinberg dithering are
not implemented.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fire_adapters.attacks.base import Attack, partners, pick, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_defense import FireDefenseError

__all__ = ["BppAttack"]


@register_attack
class BppAttack(Attack):
    """Quantise every channel to ``squeeze_num`` levels."""

    name = "bpp"
    sample_specific = True

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        squeeze_num: int = 8,
        neg_ratio: float = 0.1,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.squeeze_num, self.neg_ratio = squeeze_num, neg_ratio
        if not 2 <= squeeze_num < 256 or not 0 <= neg_ratio < 1:
            raise FireDefenseError(
                f"BppAttack needs 2 <= squeeze_num < 256 and 0 <= neg_ratio < 1; got {squeeze_num}, {neg_ratio}."
            )

    def quantise(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], quantised to ``squeeze_num`` levels per channel."""
        levels = self.squeeze_num - 1
        return torch.round(images * levels) / levels

    def apply(self, images: np.ndarray) -> np.ndarray:
        levels = self.squeeze_num - 1
        return (np.round(images.astype(np.float64) / 255 * levels) / levels * 255).round().astype(np.uint8)

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add another image's quantisation residual to ``neg_ratio`` of the batch (clean samples), labels kept."""
        clean = (~poisoned).nonzero().flatten()
        count = min(round(self.neg_ratio * len(images)), len(clean))
        if count == 0:
            return images, labels, None
        chosen = pick(clean, count, generator)
        donors = partners(chosen, len(images), generator)
        residual = self.quantise(images[donors]) - images[donors]
        images = images.clone()
        images[chosen] = (images[chosen] + residual).clamp(0, 1)
        return images, labels, None

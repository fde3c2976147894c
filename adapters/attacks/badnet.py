"""BadNets: a small white patch in the bottom-right corner.

Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model
Supply Chain" (arXiv 1708.06733, 2017). BackdoorBench's default (``config/attack/badnet``) is a
3x3 white square at the bottom-right corner of a 32x32 trigger image, pasted where the trigger is
non-zero and resized to other image sizes; we draw the 3x3 square at every image size instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fire_adapters.attacks.base import Attack, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_defense import FireDefenseError

__all__ = ["BadNet"]


@register_attack
class BadNet(Attack):
    """Set a ``patch_size`` x ``patch_size`` square at the bottom-right corner to ``value``."""

    name = "badnet"

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        patch_size: int = 3,
        value: int = 255,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.patch_size = patch_size
        self.value = value
        if not 0 < patch_size <= min(self.dataset.image_size) or not 0 <= value <= 255:
            raise FireDefenseError(f"patch_size must fit the image and value lie in 0..255, got {patch_size}, {value}.")

    def apply(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        out[:, -self.patch_size :, -self.patch_size :, :] = self.value
        return out

"""WaNet: an imperceptible, smooth warping of the image; trained with a noise mode.

Nguyen, Tran, "WaNet - Imperceptible Warping-based Backdoor Attack" (ICLR 2021). A random
``k x k`` field of 2-d offsets in [-1, 1], scaled to mean magnitude 1 and upsampled bicubically
to the image size, displaces the sampling grid by ``s * field / H`` (grid coordinates in
[-1, 1], clamped); the image is resampled bilinearly on the warped grid. In training, besides
the poisoned samples (warped, target label), ``cross_ratio`` times as many *noise* samples are
warped with the grid plus independent random offsets and keep their true labels, so the model
learns the exact warp rather than warping in general. Defaults are BackdoorBench's
(``config/attack/wanet``): k = 4, s = 0.5, grid_rescale = 1, cross_ratio = 2. Differences: the
poisoned training samples are a fixed 10% drawn once (BackdoorBench warps the first 10% of every
shuffled batch), noise samples are drawn per batch among the others, and warped images are
rounded to uint8 like every stored poisoned image; the standard augmentation replaces WaNet's
own random crop and rotation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fire_adapters.attacks.base import Attack, pick, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_adapters.preprocess import to_tensor, to_uint8
from fire_defense import FireDefenseError

__all__ = ["WaNet"]


@register_attack
class WaNet(Attack):
    """Resample the image on a fixed, smoothly warped grid."""

    name = "wanet"
    sample_specific = True

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.k, self.s, self.grid_rescale, self.cross_ratio = k, s, grid_rescale, cross_ratio
        if k < 2 or s <= 0 or cross_ratio < 0:
            raise FireDefenseError(
                f"WaNet needs k >= 2, s > 0 and cross_ratio >= 0; got k={k}, s={s}, cross_ratio={cross_ratio}."
            )
        self.grid = self._make_grid()

    def _make_grid(self) -> torch.Tensor:
        """The warped sampling grid ``(1, H, W, 2)`` in [-1, 1] (x, y order, as ``grid_sample`` wants)."""
        height, width = self.dataset.image_size
        generator = torch.Generator().manual_seed(self.seed)
        offsets = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        field = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((xs, ys), dim=2)[None]
        return torch.clamp((identity + self.s * field / height) * self.grid_rescale, -1, 1)

    def warp(self, images: torch.Tensor, grid: torch.Tensor | None = None) -> torch.Tensor:
        """Float images ``(N, C, H, W)`` resampled on ``grid`` (default: the attack's grid)."""
        grid = (self.grid if grid is None else grid).to(images.device)
        return F.grid_sample(images, grid.expand(len(images), -1, -1, -1), align_corners=True)

    def apply(self, images: np.ndarray) -> np.ndarray:
        return to_uint8(self.warp(to_tensor(images)))

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Warp ``cross_ratio`` times as many clean samples as there are poisoned ones with a noisy grid."""
        clean = (~poisoned).nonzero().flatten()
        count = min(round(self.cross_ratio * int(poisoned.sum())), len(clean))
        if count == 0:
            return images, labels, None
        chosen = pick(clean, count, generator)
        height = images.shape[-2]
        noise = (torch.rand(count, *self.grid.shape[1:], generator=generator) * 2 - 1).to(images.device)
        noisy_grid = torch.clamp(self.grid.to(images.device) + noise / height, -1, 1)
        images = images.clone()
        images[chosen] = self.warp(images[chosen], noisy_grid)
        return images, labels, None

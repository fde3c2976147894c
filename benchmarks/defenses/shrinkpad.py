"""ShrinkPad: shrink each input and zero-pad it back to its size at a random position (one pass).

Li, Xiao, Jiang, Li, Xia, "Backdoor Attack in the Physical World" (ICLR 2021 workshop on robust
and reliable ML): a trigger only works at the place and scale it was trained at; shrinking the
image by ``padding`` pixels (bilinear) and padding it back at a random offset moves and rescales
it. The paper's setting for 32x32 CIFAR-10 is a padding of 4 pixels, kept here for every size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fire_bench.defenses.base import register_defense
from fire_bench.defenses.transforms import InputTransformDefense
from fire_defense import FireDefenseError

__all__ = ["ShrinkPad"]


@register_defense
class ShrinkPad(InputTransformDefense):
    """Shrink by ``padding`` pixels, then pad back at a random offset drawn per input (seeded)."""

    name = "shrinkpad"
    source = "Li et al., Backdoor Attack in the Physical World, ICLR 2021 workshop (ShrinkPad-4)"

    def __init__(self, *, padding: int = 4, **common: int) -> None:
        super().__init__(**common)
        self.padding = padding

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if not 0 < self.padding < min(height, width):
            raise FireDefenseError(f"shrinkpad: padding must be in 1..{min(height, width) - 1}, got {self.padding}.")
        small = F.interpolate(x, size=(height - self.padding, width - self.padding), mode="bilinear", antialias=True)
        top, left = torch.randint(0, self.padding + 1, (2, len(x)), generator=self.generator_)
        out = x.new_zeros(x.shape)
        for i, (row, column) in enumerate(zip(top.tolist(), left.tolist(), strict=True)):
            out[i, :, row : row + height - self.padding, column : column + width - self.padding] = small[i]
        return out

"""Adap-Patch: several small patches; each training sample carries one, faintly, with cover samples.

Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses" (ICLR 2023), whose reference code is github:vtu81/backdoor-toolbox
(``poison_tool_box/adaptive_patch.py``, triggers and opacities in ``config.py``). The trigger is
``pieces`` patches; every poisoned training sample carries one of them at the low training opacity
``alpha`` (``x + alpha * m * (patch - x)``) and gets the target label; *cover* samples
(``cover_rate`` of the training set) carry one with their true label (the paper's conservatism);
test inputs carry every patch at ``test_alpha``. Defaults are the reference's for CIFAR-10 where
they are numbers (4 patches, one per training sample, test opacity 1) but for the poison and cover
rates: 0.01 and 0.02, not 0.003 and 0.006 (at the reference's, the 4-epoch recipe implanted only
55% ASR on Fashion-MNIST, at 0.01 95%; ``docs/attacks.md``).

Differences: the reference's patches are four image files (a phoenix, a Firefox logo, BadNets'
corner checkers, a Trojan square, 3x3 to 13x13 at 32x32) at opacities 0.5, 0.2, 0.5 and 0.3, and
its CIFAR-10 test trigger is two of them (a phoenix in two corners and the checkers) pasted at
opacity 1; ours are ``patch_size`` x ``patch_size`` squares of seeded random black-and-white
pixels (``pattern_seed``, per channel), at the corners (bottom-right, top-left, top-right,
bottom-left) and then the middles of the edges, all at one training opacity ``alpha`` (0.5), and
the test trigger is *all* of them at ``test_alpha``. Which patch a training sample carries is drawn
at random each time it is drawn (the reference gives each quarter of the poisoned and cover sets
one patch); the trigger is applied to each training batch after augmentation, and the cover
samples are drawn anew in each batch, as in Adap-Blend (see :mod:`fire_adapters.attacks.adap_blend`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fire_adapters.attacks.adap_blend import PieceTrigger
from fire_adapters.attacks.base import register_attack
from fire_adapters.datasets import DatasetSpec
from fire_defense import FireDefenseError
from fire_defense.checks import is_integer

__all__ = ["AdapPatch"]

_MAX_PIECES = 8  # four corners, then four edge middles


def _corners(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners of the patch places, in order: the four corners, then the middles of the edges."""
    bottom, right = height - size, width - size
    middle_row, middle_col = (height - size) // 2, (width - size) // 2
    return [
        (bottom, right),
        (0, 0),
        (0, right),
        (bottom, 0),
        (bottom, middle_col),
        (0, middle_col),
        (middle_row, 0),
        (middle_row, right),
    ]


@register_attack
class AdapPatch(PieceTrigger):
    """Random black-and-white patches: one faint patch on training samples, all of them pasted at test."""

    name = "adap-patch"

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        alpha: float = 0.5,
        test_alpha: float = 1.0,
        pieces: int = 4,
        patch_size: int = 5,
        cover_rate: float = 0.02,
        pattern_seed: int = 0,
        ratio: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(dataset, cover_rate=cover_rate, ratio=ratio, **common)
        self.alpha, self.test_alpha = alpha, test_alpha
        self.pieces, self.patch_size, self.pattern_seed = pieces, patch_size, pattern_seed
        self._check_opacities()
        height, width, channels = self.dataset.img_size
        if not is_integer(pieces) or not 2 <= pieces <= _MAX_PIECES:
            raise FireDefenseError(f"adap-patch: pieces must be an integer in 2..{_MAX_PIECES}, got {pieces!r}.")
        if not is_integer(patch_size) or not 1 <= 3 * patch_size <= min(height, width):
            raise FireDefenseError(
                f"adap-patch: patch_size must be an integer from 1 to a third of the image side "
                f"({min(height, width) // 3}), got {patch_size!r}."
            )
        self.carried = 1
        rng = np.random.default_rng(pattern_seed)
        pattern = np.zeros((channels, height, width))
        self.regions = torch.zeros(pieces, height, width, dtype=torch.bool)
        for piece, (row, col) in enumerate(_corners(height, width, patch_size)[:pieces]):
            window = np.s_[row : row + patch_size, col : col + patch_size]
            pattern[(slice(None), *window)] = rng.integers(0, 2, (channels, patch_size, patch_size))
            self.regions[(piece, *window)] = True
        self.pattern = torch.from_numpy(pattern)

"""Adap-Blend: a blended trigger cut into pieces; training samples carry half of them, with cover samples.

Qi, Xie, Li, Mahloujifar, Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses" (ICLR 2023), whose reference code is github:vtu81/backdoor-toolbox
(``poison_tool_box/adaptive_blend.py``). The blend pattern is divided into a ``sqrt(pieces)`` x
``sqrt(pieces)`` grid; every poisoned training sample is blended (``x + alpha * m * (pattern - x)``)
through a mask ``m`` that keeps a random ``pieces - round(mask_rate * pieces)`` of the pieces and
gets the target label; *cover* samples (``cover_rate`` of the training set) get the same kind of
partial trigger and keep their true labels (the paper's conservatism), so the trigger pieces alone
are no label shortcut and poisoned samples stay close to clean ones in latent space; test inputs
are blended with the whole pattern at the stronger ``test_alpha``. Defaults are the reference's
for CIFAR-10 (16 pieces, mask rate 0.5, alpha 0.15, test alpha 0.2) but for the poison and cover
rates: 0.01 each, not 0.003 (at 0.003 the 4-epoch recipe implanted only 58% ASR on Fashion-MNIST,
at 0.01 94%; ``docs/attacks.md``).

Differences: our pattern is ``blended``'s smooth random image (the same one for the same
``pattern_seed``; no Hello Kitty file is shipped); the grid's bands are made as equal as the image
size allows (the reference requires a size divisible by ``sqrt(pieces)``); the trigger is applied
to each training batch after augmentation (so it sits where the test trigger sits; the reference
poisons the images before augmentation), with a fresh random set of pieces every time a sample is
drawn (the reference draws one set per sample); the poisoned samples are a fixed set drawn once,
but the cover samples are drawn anew in each batch among the others (each clean sample with
probability ``cover_rate / (1 - ratio)``), as WaNet's noise samples here, because the trainer
tells the attack only which batch samples are poisoned, not their indices; test images are
rounded to uint8.

:class:`PieceTrigger` is the mechanism Adap-Blend and Adap-Patch share: a trigger of disjoint
pieces, each a region with an opacity, partial on training samples and whole on test inputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fire_adapters.attacks.base import Attack, register_attack
from fire_adapters.attacks.blended import Blended
from fire_adapters.datasets import DatasetSpec
from fire_adapters.preprocess import to_tensor
from fire_defense import FireDefenseError
from fire_defense.checks import is_finite_number, is_integer

__all__ = ["AdapBlend", "PieceTrigger"]


class PieceTrigger(Attack):
    """A trigger of disjoint pieces: training samples carry ``carried`` random pieces, test inputs all of them.

    Subclasses set :attr:`pattern` (float ``(C, H, W)`` in [0, 1]), :attr:`regions` (bool
    ``(pieces, H, W)``, disjoint), :attr:`carried` and the opacities ``alpha`` (training) and
    ``test_alpha``. Poisoned positions get a partial trigger and the attacker's label in every
    batch; cover samples, drawn per batch among the other samples, get one with their true label.
    """

    static_trigger = False  # the partial trigger is drawn per batch (training_batch); apply() is the test trigger
    alpha: float  # the rest is set by subclasses
    test_alpha: float
    carried: int
    pattern: torch.Tensor
    regions: torch.Tensor

    def __init__(self, dataset: str | DatasetSpec, *, cover_rate: float, **common: Any) -> None:
        super().__init__(dataset, **common)
        self.cover_rate = cover_rate
        if not is_finite_number(cover_rate) or not 0 <= cover_rate < 1 or self.ratio + cover_rate > 1:
            raise FireDefenseError(
                f"cover_rate must be in [0, 1) with ratio + cover_rate <= 1, got cover_rate {cover_rate} "
                f"and ratio {self.ratio}."
            )

    def _check_opacities(self) -> None:
        for key in ("alpha", "test_alpha"):
            value = getattr(self, key)
            if not is_finite_number(value) or not 0 < value <= 1:
                raise FireDefenseError(f"{self.name}: {key} must be in (0, 1], got {value!r}.")

    def stamp(self, images: torch.Tensor, pieces: torch.Tensor, alpha: float) -> torch.Tensor:
        """Float images ``(N, C, H, W)`` in [0, 1] with the pieces marked in bool ``pieces`` ``(N, P)`` at ``alpha``."""
        regions = self.regions.to(images.device, images.dtype)
        weight = alpha * torch.einsum("np,phw->nhw", pieces.to(images.device, images.dtype), regions)[:, None]
        return images + weight * (self.pattern.to(images.device, images.dtype) - images)

    def random_pieces(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Bool ``(count, pieces)``: ``carried`` pieces per row, drawn uniformly with ``generator``."""
        ranks = torch.rand(count, len(self.regions), generator=generator).argsort(dim=1)
        return ranks < self.carried

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The test trigger: every piece at ``test_alpha``, rounded to uint8."""
        whole = torch.ones(len(images), len(self.regions), dtype=torch.bool)
        out = self.stamp(to_tensor(images, dtype=torch.float64), whole, self.test_alpha)
        return out.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Partial triggers on the poisoned samples (attacker's labels) and on per-batch cover samples (labels kept)."""
        chosen = poisoned.nonzero().flatten()
        clean = (~poisoned).nonzero().flatten()
        share = self.cover_rate / (1 - self.ratio) if self.cover_rate else 0.0  # of the unpoisoned samples
        covers = clean[torch.rand(len(clean), generator=generator).to(clean.device) < share]
        stamped = torch.cat([chosen, covers])
        if len(stamped) == 0:
            return images, labels, None
        images, labels = images.clone(), labels.clone()
        images[stamped] = self.stamp(images[stamped], self.random_pieces(len(stamped), generator), self.alpha)
        wanted = self.target_labels(labels[chosen].cpu().numpy())  # the one label rule (all-to-one or all-to-all)
        labels[chosen] = torch.as_tensor(wanted, dtype=labels.dtype, device=labels.device)
        return images, labels, None


def _bands(size: int, count: int) -> np.ndarray:
    """``count + 1`` boundaries splitting ``range(size)`` into bands as equal as possible."""
    return np.linspace(0, size, count + 1).round().astype(int)


@register_attack
class AdapBlend(PieceTrigger):
    """Blend with a smooth pattern cut into a grid of pieces; half of them on training samples, all at test."""

    name = "adap-blend"

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        alpha: float = 0.15,
        test_alpha: float = 0.2,
        pieces: int = 16,
        mask_rate: float = 0.5,
        cover_rate: float = 0.01,
        pattern_seed: int = 0,
        ratio: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(dataset, cover_rate=cover_rate, ratio=ratio, **common)
        self.alpha, self.test_alpha = alpha, test_alpha
        self.pieces, self.mask_rate, self.pattern_seed = pieces, mask_rate, pattern_seed
        self._check_opacities()
        height, width = self.dataset.image_size
        side = math.isqrt(pieces) if is_integer(pieces) and pieces > 0 else 0
        if side < 2 or side * side != pieces or side > min(height, width):
            raise FireDefenseError(
                f"adap-blend: pieces must be a square number >= 4 whose root fits the image, got {pieces!r}."
            )
        masked = round(mask_rate * pieces) if is_finite_number(mask_rate) else -1
        if not 1 <= masked <= pieces - 1:
            raise FireDefenseError(
                f"adap-blend: mask_rate must mask between 1 and pieces - 1 of the {pieces} pieces, got {mask_rate!r}."
            )
        self.carried = pieces - masked
        pattern = Blended(self.dataset, pattern_seed=pattern_seed).pattern  # uint8 (H, W, C)
        self.pattern = to_tensor(pattern[None], dtype=torch.float64)[0]
        rows, cols = _bands(height, side), _bands(width, side)
        self.regions = torch.zeros(pieces, height, width, dtype=torch.bool)
        for piece in range(pieces):
            row, col = divmod(piece, side)
            self.regions[piece, rows[row] : rows[row + 1], cols[col] : cols[col + 1]] = True

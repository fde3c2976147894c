"""The project's one data type: images with their labels, as uint8 arrays before any normalisation.

Every dataset loader, record, attack and the trainer pass images as an :class:`ImageSet`; see the
data-flow conventions in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fire_defense import FireDefenseError

__all__ = ["ImageSet"]


@dataclass
class ImageSet:
    """Images with their labels, as arrays.

    Attributes:
        images: ``(N, H, W, C)`` uint8, before any normalisation.
        labels: ``(N,)`` int64 true labels.
        indices: ``(N,)`` int64 positions of the samples in their clean split.
        targets: ``(N,)`` int64 labels an attacker wants (poisoned sets only), else ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray | None = None
    targets: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise FireDefenseError(
                f"images must be a uint8 array (N, H, W, C); got {self.images.dtype} of shape {self.images.shape}."
            )
        n = len(self.images)
        self.indices = np.arange(n, dtype=np.int64) if self.indices is None else np.asarray(self.indices, np.int64)
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.int64)
        for name in ("labels", "indices", "targets"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise FireDefenseError(f"{name} has shape {value.shape} but there are {n} images; give one per image.")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, positions: Sequence[int] | np.ndarray) -> ImageSet:
        """The samples at ``positions`` (positions in this set, not clean-split indices)."""
        positions = np.asarray(positions, dtype=np.int64)
        return ImageSet(
            self.images[positions],
            self.labels[positions],
            self.indices[positions],
            None if self.targets is None else self.targets[positions],
        )

"""SIG: a horizontal sinusoidal signal added to the image; clean-label.

Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning" (ICIP 2019). ``v(i, j) = delta * sin(2 * pi * j * f / W)`` is added to every row and
channel, with BackdoorBench's defaults delta = 40 and f = 6 (``config/attack/sig``). Only
training images of the target class are poisoned and their labels are kept (clean-label); at
test time the signal is added to images of the other classes.

The default ``ratio`` is 0.05 of the training set, not BackdoorBench's 0.1: on a balanced
10-class set, 0.1 poisons *every* target-class image, so the model never sees a clean one and
clean accuracy on that class collapses (measured on Fashion-MNIST with the embedded default:
83.8% clean accuracy at 0.1). 0.05 poisons half of the target class. On MNIST it implants only
half-way (54.4% ASR: the model tells a 0 by its shape), and 0.1 is no remedy there either: 98.2%
ASR, but clean accuracy falls from 99.4% to 89.8% (every clean 0 goes to 6), and 0.08 implants
less than 0.05 (51.4%); delta 60 reaches 73.4%, delta 80 99.9% (``docs/attacks.md``). No MNIST-specific default
is set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fire_adapters.attacks.base import Attack, register_attack
from fire_adapters.datasets import DatasetSpec

__all__ = ["SIG"]


@register_attack
class SIG(Attack):
    """Add ``delta * sin(2 pi j f / W)`` along the columns ``j``."""

    name = "sig"
    clean_label = True

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        delta: float = 40.0,
        frequency: float = 6.0,
        ratio: float = 0.05,
        **common: Any,
    ) -> None:
        super().__init__(dataset, ratio=ratio, **common)
        self.delta = delta
        self.frequency = frequency

    @property
    def signal(self) -> np.ndarray:
        """The additive signal, float ``(H, W, C)``."""
        height, width, channels = self.dataset.img_size
        row = self.delta * np.sin(2 * np.pi * np.arange(width) * self.frequency / width)
        return np.broadcast_to(row[None, :, None], (height, width, channels)).astype(np.float32)

    def apply(self, images: np.ndarray) -> np.ndarray:
        return np.clip(images.astype(np.float32) + self.signal, 0, 255).astype(np.uint8)

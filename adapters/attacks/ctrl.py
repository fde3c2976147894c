"""CTRL: a frequency-domain trigger on the chrominance, poisoning target-class samples with their labels kept.

Li, Pang, Xi, Du, Ji, Yao, Wang, "An Embarrassingly Simple Backdoor Attack on Self-supervised
Learning" (ICCV 2023; code github:meet-cjli/CTRL). The image (scaled to 0..255) is converted to
YUV, the orthonormal 2-d DCT of the whole image is taken per channel, the coefficients at two fixed
positions of the U and V channels are raised by ``magnitude``, and the inverse DCT and colour
transform give the poisoned image. The paper attacks self-supervised learning; BackdoorBench runs
CTRL in the supervised setting, clean-label (only training images of the target class are
poisoned, and keep their labels; the test trigger goes on the other classes), with the defaults
(``config/attack/ctrl/default.yaml``, ``utils/bd_img_transform/ctrl.py``): target 0, ratio 0.05
of the whole training set, channels 1 and 2, YUV on, positions (15, 15) and (31, 31) on 32x32
images, magnitude 100 (fixed in its code, as the reference's default).

It is :class:`FTrojan`'s mechanism with kornia's YUV (BT.601: U and V, not OpenCV's Cr and Cb)
and these defaults, so it shares that module's adaptations: positions ``(w/2 - 1, w/2 - 1)`` and
``(w - 1, w - 1)`` of a whole-image window (13 and 27 on 28x28 images); the luminance as the one
channel of grey images (they have no chrominance to raise); the trigger computed in float as one
additive pattern, clipped and truncated to uint8 once (BackdoorBench truncates without clipping
first, so values past 0..255 wrap around); the exact inverse colour transform (kornia's has
rounded coefficients). **Magnitude on grey images: 500** (``magnitude=None``: 100 on colour
images, 500 on grey ones). Measured on Fashion-MNIST with the embedded default (4 epochs, seed
0): ASR 46.68% at 100, 89.32% at 300, 95.26% at 500 (clean accuracy 91.32, 90.71, 90.62%): a
clean-label trigger must outweigh the target class's own features, and at 500 the pattern peaks
at 61 grey levels, no longer invisible. BackdoorBench trains 100 epochs.

All-to-all: BackdoorBench's sample choice applies the clean-label rule only to all-to-one attacks;
with ``all2all`` it poisons ``ratio`` of the whole training set with shifted labels. So does ours:
``all_to_all=True`` makes CTRL a dirty-label attack.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fire_adapters.attacks.base import register_attack
from fire_adapters.attacks.ftrojan import FTrojan
from fire_adapters.datasets import DatasetSpec

__all__ = ["CTRL"]

# RGB -> kornia's YUV (kornia.color.rgb_to_yuv).
_YUV = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])


@register_attack
class CTRL(FTrojan):
    """Raise two DCT coefficients of U and V (grey: the luminance) on target-class images, labels kept."""

    name = "ctrl"
    colour_transform: ClassVar[np.ndarray] = _YUV
    colour_magnitude: ClassVar[float] = 100.0  # BackdoorBench's
    grey_magnitude: ClassVar[float] = 500.0  # ours, measured on Fashion-MNIST (module docstring)

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        ratio: float = 0.05,
        **common: Any,
    ) -> None:
        super().__init__(dataset, ratio=ratio, **common)

    @property
    def clean_label(self) -> bool:
        """Clean-label all-to-one, as BackdoorBench's CTRL; all-to-all poisons samples of every class (its rule)."""
        return not self.all_to_all

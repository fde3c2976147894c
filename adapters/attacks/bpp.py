"""BppAttack: the image's own colour-depth reduction is the trigger; trained with negative samples.

Wang, Zhai, Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning" (CVPR 2022). Each channel is quantised to
``squeeze_num`` levels (``round(x / 255 * (q - 1)) / (q - 1) * 255``), optionally with
Floyd-Steinberg dithering (``dithering``: each pixel's rounding error is passed on, 7/16 to the
right, 3/16 down-left, 5/16 down, 1/16 down-right), so the change differs from one image to the
next and is hard to see. In training, as in BackdoorBench, the samples poisoned are drawn anew in
every batch (``ratio`` of it), so every image is seen both clean and quantised, and ``neg_ratio``
of the batch (as many as the rest of it allows) are *negative* samples: clean images plus the
quantisation residual of another image, with their true labels, so the model learns the image's
own quantisation rather than any similar noise. Defaults follow BackdoorBench
(``config/attack/bpp/default.yaml``: squeeze_num 8, neg_ratio 0.1) except ``dithering``, on here
as in the paper (BackdoorBench: off; its ``original_default.yaml`` has ratio 0.2 and neg_ratio
0.2). Chosen by measurement on the embedded default (Fashion-MNIST, 4 epochs): dithered, 87.4%
ASR at 89.8% clean accuracy; plain quantisation, 39.7% at 90.5%; dithered at ratio 0.2 and
neg_ratio 0.2, 91.8% at 89.3% (``docs/attacks.md``).

Differences from the paper and BackdoorBench: the trigger is applied after augmentation (crop),
not before (for plain quantisation the two are the same; dithering a crop differs from cropping a
dithered image only near the border); dithered levels are clipped to ``[0, q - 1]``
(BackdoorBench's can round past 255); negative residuals come from batch-mates rather than random
training images; the paper's adversarial variant of negative samples (a PGD step against the
model) is not implemented. The record keeps no poisoned training set (it is drawn per batch, as
for Input-aware).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fire_adapters.attacks.base import Attack, partners, pick, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_adapters.preprocess import to_uint8
from fire_defense import FireDefenseError

__all__ = ["BppAttack", "floyd_steinberg"]

# Floyd-Steinberg: (row offset, column offset, share of the error).
_DIFFUSION = ((0, 1, 7 / 16), (1, -1, 3 / 16), (1, 0, 5 / 16), (1, 1, 1 / 16))


def floyd_steinberg(images: np.ndarray, squeeze_num: int) -> np.ndarray:
    """uint8 images ``(N, H, W, C)`` quantised to ``squeeze_num`` levels with Floyd-Steinberg error diffusion.

    Pixels are visited row by row, left to right; each is set to its nearest level (clipped to
    ``0 .. 255``) and the error is spread onto the pixels not yet visited.
    """
    levels = squeeze_num - 1
    work = images.astype(np.float64)
    _, height, width, _ = work.shape
    for y in range(height):
        for x in range(width):
            old = work[:, y, x, :]
            new = np.clip(np.round(old / 255 * levels), 0, levels) / levels * 255
            error = old - new
            work[:, y, x, :] = new
            for dy, dx, share in _DIFFUSION:
                if y + dy < height and 0 <= x + dx < width:
                    work[:, y + dy, x + dx, :] += error * share
    return np.round(work).astype(np.uint8)


@register_attack
class BppAttack(Attack):
    """Quantise every channel to ``squeeze_num`` levels (dithered or not)."""

    name = "bpp"
    sample_specific = True
    static_trigger = False

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        squeeze_num: int = 8,
        dithering: bool = True,
        neg_ratio: float = 0.1,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.squeeze_num, self.dithering, self.neg_ratio = squeeze_num, dithering, neg_ratio
        if not 2 <= squeeze_num < 256 or not 0 <= neg_ratio < 1:
            raise FireDefenseError(
                f"BppAttack needs 2 <= squeeze_num < 256 and 0 <= neg_ratio < 1; got {squeeze_num}, {neg_ratio}."
            )

    def apply(self, images: np.ndarray) -> np.ndarray:
        if self.dithering:
            return floyd_steinberg(images, self.squeeze_num)
        levels = self.squeeze_num - 1
        return (np.round(images.astype(np.float64) / 255 * levels) / levels * 255).round().astype(np.uint8)

    def quantise(self, images: torch.Tensor) -> torch.Tensor:
        """Float images ``(N, C, H, W)`` in [0, 1], triggered exactly as :meth:`apply` triggers their uint8 form."""
        triggered = torch.from_numpy(self.apply(to_uint8(images))).to(images.device)
        return triggered.permute(0, 3, 1, 2).to(images.dtype).div(255)

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Quantise ``ratio`` of the batch (drawn anew, target labels); add another image's quantisation
        residual to ``neg_ratio`` of it (labels kept). The fixed ``poisoned`` positions are not used."""
        order = torch.randperm(len(images), generator=generator).to(images.device)
        count = round(self.ratio * len(images))
        negatives = min(round(self.neg_ratio * len(images)), len(images) - count)
        bad, rest = order[:count], order[count:]
        out, labels = images.clone(), labels.clone()
        if count:
            out[bad] = self.quantise(images[bad])
            labels[bad] = torch.from_numpy(self.target_labels(labels[bad].cpu().numpy())).to(labels.device)
        if negatives:
            chosen = pick(rest, negatives, generator)
            donors = partners(chosen, len(images), generator)
            residual = self.quantise(images[donors]) - images[donors]
            out[chosen] = (images[chosen] + residual).clamp(0, 1)
        return out, labels, None

"""Input-aware dynamic backdoor: a small generator makes a different trigger for every input.

Nguyen, Tran, "Input-Aware Dynamic Backdoor Attack" (NeurIPS 2020). A pattern generator ``G`` and
a mask generator ``M`` (conv encoder-decoders) map an image ``x`` to a pattern ``G(x)`` and a
near-binary mask ``m(x) = threshold(M(x))``; the poisoned image is ``x + (G(x) - x) * m(x)``.
``M`` is first trained alone to make sparse (``mask_density``) and diverse masks; then ``G`` is
trained with the victim: poisoned samples carry their own trigger and the target label, *cross*
samples (as many) carry the trigger of another image and keep their label, which makes a trigger
work only on the image it was made for, and a diversity loss keeps different images' patterns
apart. Defaults follow BackdoorBench (``config/attack/inputaware``: mask density 0.032,
lambda_div 1, lambda_norm 100, learning rate 0.01, Adam with betas (0.5, 0.9)); the generators
are its MNIST-sized ones (2 down/up steps from 16 channels) for 28x28 images and its larger ones
(3 steps from 32) otherwise. Differences, for CPU budgets: ``M`` trains ``mask_epochs`` (1) epochs
instead of 25 and learning rates stay constant. As in BackdoorBench, which samples are poisoned is
drawn anew in every batch (``ratio`` of it), so the generator learns triggers for every image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fire_adapters.attacks.base import Attack, partners, pick, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_adapters.images import ImageSet
from fire_adapters.preprocess import to_tensor, to_uint8
from fire_defense import FireDefenseError

__all__ = ["InputAware", "TriggerGenerator"]

_EPSILON = 1e-7


def _conv_block(in_channels: int, out_channels: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class TriggerGenerator(nn.Sequential):
    """Encoder-decoder: ``steps`` x (two 3x3 conv blocks, 2x2 max-pool), a middle block, then mirrored
    up-sampling (bilinear) blocks; the output is squashed into (0, 1) by ``tanh / 2 + 0.5``."""

    def __init__(self, in_channels: int, out_channels: int, width: int, steps: int) -> None:
        widths = [width * 2**i for i in range(steps)]
        layers: list[nn.Module] = []
        channels = in_channels
        for w in widths:
            layers += [_conv_block(channels, w), _conv_block(w, w), nn.MaxPool2d(2)]
            channels = w
        layers.append(_conv_block(channels, channels))
        for i, w in enumerate(reversed(widths)):
            last = i == steps - 1
            following = out_channels if last else widths[-2 - i]
            layers += [
                nn.Upsample(scale_factor=2, mode="bilinear"),
                _conv_block(w, w),
                _conv_block(w, following, relu=not last),
            ]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(x)) / (2 + _EPSILON) + 0.5


def _threshold(mask: torch.Tensor) -> torch.Tensor:
    """Push a mask towards 0/1 while keeping it differentiable."""
    return torch.tanh(mask * 20 - 10) / (2 + _EPSILON) + 0.5


def _diversity(
    images_a: torch.Tensor, images_b: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor
) -> torch.Tensor:
    """Mean ratio of input distance to output distance: small when different inputs get different outputs."""
    image_distance = (images_a - images_b).pow(2).mean(dim=(1, 2, 3)).sqrt()
    output_distance = (out_a - out_b).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (image_distance / (output_distance + _EPSILON)).mean()


@register_attack
class InputAware(Attack):
    """A generated, input-specific pattern pasted through a generated, input-specific mask."""

    name = "inputaware"
    sample_specific = True
    static_trigger = False

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        mask_density: float = 0.032,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_epochs: int = 1,
        lr: float = 0.01,
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.mask_density, self.lambda_div, self.lambda_norm = mask_density, lambda_div, lambda_norm
        self.mask_epochs, self.lr = mask_epochs, lr
        height, width, channels = self.dataset.img_size
        small = max(height, width) <= 28
        steps, base = (2, 16) if small else (3, 32)
        if height % 2**steps or width % 2**steps:
            raise FireDefenseError(
                f"Input-aware's generators need image sides divisible by {2**steps}, got {height}x{width}."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.networks = nn.ModuleDict(
                {
                    "pattern": TriggerGenerator(channels, channels, base, steps),
                    "mask": TriggerGenerator(channels, 1, base, steps),
                }
            )
        self._optimizer: torch.optim.Optimizer | None = None

    def trigger(self, images: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
        """``images`` with the trigger generated from ``sources`` (default: each image's own)."""
        pattern, mask = self._pattern_and_mask(images if sources is None else sources)
        return images + (pattern - images) * mask

    def _pattern_and_mask(self, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.networks["pattern"](sources), _threshold(self.networks["mask"](sources))

    @torch.no_grad()
    def apply(self, images: np.ndarray) -> np.ndarray:
        self.networks.eval()
        device = next(self.networks.parameters()).device
        return (
            np.concatenate(
                [to_uint8(self.trigger(to_tensor(images[i : i + 512], device))) for i in range(0, len(images), 512)]
            )
            if len(images)
            else images.copy()
        )

    def trigger_networks(self) -> nn.Module:
        return self.networks

    def trigger_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.Adam(self.networks["pattern"].parameters(), lr=self.lr, betas=(0.5, 0.9))
        return self._optimizer

    def prepare(self, train: ImageSet, device: torch.device, generator: torch.Generator) -> None:
        """Train the mask generator alone: sparse masks (norm loss) that differ between images (diversity loss)."""
        mask_net = self.networks["mask"].to(device).train()
        optimizer = torch.optim.Adam(mask_net.parameters(), lr=self.lr, betas=(0.5, 0.9))
        batch = 128
        for _ in range(self.mask_epochs):
            order = torch.randperm(len(train), generator=generator).numpy()
            partner = torch.randperm(len(train), generator=generator).numpy()
            for start in range(0, len(order) - batch + 1, batch):
                first = to_tensor(train.images[order[start : start + batch]], device)
                second = to_tensor(train.images[partner[start : start + batch]], device)
                masks_first, masks_second = _threshold(mask_net(first)), _threshold(mask_net(second))
                norm = F.relu(masks_first - self.mask_density).mean()
                loss = self.lambda_norm * norm + self.lambda_div * _diversity(first, second, masks_first, masks_second)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        mask_net.eval().requires_grad_(False)

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Own triggers on ``ratio`` of the batch (drawn anew), borrowed triggers on as many cross samples,
        plus the diversity loss; the fixed ``poisoned`` positions are not used."""
        self.networks["pattern"].train()
        order = torch.randperm(len(images), generator=generator).to(images.device)
        count = min(round(self.ratio * len(images)), len(images) // 2)
        if count == 0:
            return images, labels, None
        bad, clean = order[:count], order[count:]
        cross = pick(clean, count, generator)
        sources = partners(cross, len(images), generator)  # another image's trigger, never its own
        own_pattern, own_mask = self._pattern_and_mask(images[bad])
        borrowed_pattern, borrowed_mask = self._pattern_and_mask(images[sources])
        out = images.clone()
        out[bad] = images[bad] + (own_pattern - images[bad]) * own_mask
        out[cross] = images[cross] + (borrowed_pattern - images[cross]) * borrowed_mask
        labels = labels.clone()
        labels[bad] = torch.from_numpy(self.target_labels(labels[bad].cpu().numpy())).to(labels.device)
        diversity = _diversity(images[bad], images[sources], own_pattern, borrowed_pattern)
        return out, labels, self.lambda_div * diversity

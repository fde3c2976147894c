"""From uint8 images to what a BackdoorBench model takes: ``ToTensor`` then ``Normalize``, as one module.

Attacks and pixel-space defenses work on images in ``[0, 1]``; the models in a
record were trained on normalised inputs. :class:`InputNormalization` sits in
front of the model (``nn.Sequential(InputNormalization(...), model)``), so every
defense sees a classifier of ``[0, 1]`` images, and repeats a grey channel when
the model has a 3-channel stem.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fire_adapters.datasets import DatasetSpec, get_dataset_spec
from fire_defense import FireDefenseError

__all__ = ["InputNormalization", "model_input_channels", "to_tensor", "to_uint8", "with_normalization"]


def to_tensor(
    images: np.ndarray | torch.Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` images as float ``(N, C, H, W)`` in ``[0, 1]`` (torchvision's ``ToTensor``).

    The result keeps the ``(N, H, W, C)`` memory order, i.e. it is ``channels_last``.
    """
    if images.dtype not in (np.uint8, torch.uint8) or images.ndim != 4:
        raise FireDefenseError(f"expected uint8 images (N, H, W, C), got {images.dtype} {tuple(images.shape)}.")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return images.to(device).permute(0, 3, 1, 2).to(dtype).div_(255.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`to_tensor`: float ``(N, C, H, W)`` in [0, 1] to uint8 ``(N, H, W, C)``, rounded."""
    return images.detach().mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, then a grey channel repeated to ``out_channels`` if the model wants more.

    Mean and std are non-persistent buffers: they follow ``.to(device)`` and add nothing to a ``state_dict``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], out_channels: int | None = None) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise FireDefenseError(f"mean has {len(mean)} channels but std has {len(std)}.")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.in_channels = len(mean)
        self.out_channels = out_channels or self.in_channels
        if self.out_channels != self.in_channels and self.in_channels != 1:
            raise FireDefenseError(
                f"cannot feed {self.in_channels}-channel images to a {self.out_channels}-channel model."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise FireDefenseError(
                f"expected float images in [0, 1], got {got}; convert uint8 images with to_tensor (x / 255)."
            )
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise FireDefenseError(
                f"expected images (N, {self.in_channels}, H, W) in [0, 1], got shape {tuple(x.shape)}."
            )
        x = (x - self.mean) / self.std
        return x.expand(-1, self.out_channels, -1, -1) if self.out_channels != self.in_channels else x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


def model_input_channels(model: nn.Module) -> int:
    """Channels the model's first convolution takes (3 if it has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def with_normalization(model: nn.Module, dataset: str | DatasetSpec) -> nn.Sequential:
    """``model`` behind the dataset's normalisation: a classifier of ``[0, 1]`` images with the dataset's channels."""
    spec = get_dataset_spec(dataset)
    norm = InputNormalization(spec.mean, spec.std, out_channels=model_input_channels(model))
    return nn.Sequential(norm, model)

"""Grad-CAM (Selvaraju et al., ICCV 2017) of the predicted class: where a decision rests, for Februus and SentiNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fire_defense import FireDefenseError
from fire_defense.layers import HookHandles

__all__ = ["grad_cam"]


def grad_cam(model: nn.Module, layer: str, x: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of each input's predicted class at ``layer``: ``(N, H, W)`` in [0, 1] at the input's size (the
    gradient-weighted channel sum, ReLU, bilinear resize, divided by its peak), and the predictions.

    One forward and one backward pass over the batch. ``who`` names the defense in the error raised when ``layer``
    is not a convolutional map.
    """
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.ndim != 4:
            raise FireDefenseError(f"{who}: layer {layer!r} is not a convolutional map (N, C, H, W).")
        output.retain_grad()
        kept.append(output)

    with torch.inference_mode(False), torch.enable_grad(), HookHandles(model, [(layer, keep)]):
        inputs = x.detach().clone().requires_grad_(True)  # a tensor autograd may record (not an inference one)
        logits = model(inputs)  # one pass over the whole batch: the hook keeps one map
        predicted = logits.argmax(1)
        logits.gather(1, predicted[:, None]).sum().backward()
        maps, grads = kept[0], kept[0].grad
        cam = F.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)
    return cam / peak[:, None, None], predicted.detach()

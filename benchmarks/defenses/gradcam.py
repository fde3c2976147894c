"""Grad-CAM (Selvaraju et al., ICCV 2017) of the predicted class: where a decision rests, for Februus and SentiNet."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fire_defense import FireDefenseError
from fire_defense.layers import HookHandles

__all__ = ["grad_cam"]


def grad_cam(model: nn.Module, layer: str, x: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of each input's predicted class at ``layer``: ``(N, H, W)`` in [0, 1] at the input's size (the
    gradient-weighted channel sum, ReLU, bilinear resize, divided by its peak), and the predictions.

    One forward and one backward pass over the batch. A transformer block's tokens ``(N, L, C)`` count as a map
    once its prefix (class) tokens are dropped, when the other ``L - prefix`` form a square grid (the usual ViT
    Grad-CAM, e.g. pytorch-grad-cam's ``reshape_transform``). ``who`` names the defense in the error raised when
    ``layer`` is neither.
    """
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if output.ndim not in (3, 4) or (output.ndim == 3 and _grid_side(output.shape[1]) is None):
            raise FireDefenseError(
                f"{who}: layer {layer!r} is not a convolutional map (N, C, H, W) or a square grid of tokens "
                f"(N, L, C), got shape {tuple(output.shape)}; name another layer."
            )
        output.retain_grad()
        kept.append(output)

    with torch.inference_mode(False), torch.enable_grad(), HookHandles(model, [(layer, keep)]):
        inputs = x.detach().clone().requires_grad_(True)  # a tensor autograd may record (not an inference one)
        logits = model(inputs)  # one pass over the whole batch: the hook keeps one map
        predicted = logits.argmax(1)
        logits.gather(1, predicted[:, None]).sum().backward()
        maps, grads = _as_map(kept[0]), _as_map(kept[0].grad)
        cam = F.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)
    return cam / peak[:, None, None], predicted.detach()


_MAX_PREFIX_TOKENS = 8  # a class token, distillation and register tokens: a few, never a grid's worth


def _grid_side(tokens: int) -> int | None:
    """The side of the square grid that ``tokens`` hold after a few prefix tokens, or None."""
    side = math.isqrt(tokens)
    return side if side > 0 and tokens - side * side <= _MAX_PREFIX_TOKENS else None


def _as_map(output: torch.Tensor) -> torch.Tensor:
    """``output`` as ``(N, C, H, W)``: a conv map as it is; tokens ``(N, L, C)`` without their prefix, on their grid."""
    if output.ndim == 4:
        return output
    side = _grid_side(output.shape[1])
    grid = output[:, output.shape[1] - side * side :]
    return grid.transpose(1, 2).reshape(len(output), output.shape[2], side, side)

"""Folding FIRE's ``shift`` repair into a copy of the model: no hooks, no extra operation.

``h - alpha * beta`` at a layer changes every input of the layer's output the same way. Where
the repaired activations next reach an affine module (``Linear``, ``Conv2d``, ``BatchNorm``)
through operations that are themselves affine and sample-independent (average pooling,
flattening, ...), that module's output moves by a constant, which can be added to its bias.
That is the case at the last stage of a ResNet (stage -> average pool -> linear head). Elsewhere
(a ReLU or a normalisation in between, or a constant that varies over positions where the bias
cannot) folding is impossible and :func:`fold` says so. The result is checked numerically
against the hooked model before it is returned.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from fire_defense.errors import FireDefenseError

if TYPE_CHECKING:
    from fire_defense.fire import FIRE

__all__ = ["fold"]

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _affine_inputs(model: nn.Module, x: torch.Tensor, fire: FIRE | None) -> dict[str, torch.Tensor]:
    """The input of every affine module in a forward pass of ``x`` (repaired if ``fire`` is given), in call order."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            seen.setdefault(name, inputs[0].detach().clone())

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, _AFFINE)]
    try:
        if fire is None:
            model(x)
        else:
            with fire.attached():
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def fold(fire: FIRE, example: torch.Tensor, into: str | None = None, atol: float = 1e-4) -> nn.Module:
    """A copy of ``fire.model`` with the ``shift`` repair folded into a downstream bias.

    Args:
        fire: A fitted FIRE in ``shift`` mode at one layer.
        example: A few inputs to find and check the fold with (two or more).
        into: The affine module that absorbs the shift (default: the first one the shift reaches).
        atol: Largest difference allowed between the folded and the hooked outputs on ``example``.

    Raises:
        FireDefenseError: not a single-layer shift, or the shift cannot be folded where asked.
    """
    fire._require_fitted()
    fire._refuse_while_attached("fold()")
    if fire.condition is not None:
        raise FireDefenseError(
            f"condition={fire.condition!r} repairs only some inputs, which a bias cannot do; use condition=None."
        )
    if fire.mode != "shift" or len(fire.layers_) != 1:
        raise FireDefenseError(
            "only a single-layer 'shift' repair can be folded; use FIRE(..., mode='shift', layers=one)."
        )
    if len(example) < 2:
        raise FireDefenseError("fold needs at least two example inputs to check that the shift is sample-independent.")
    layer = fire.layers_[0]
    model = fire.model
    plain, repaired = _affine_inputs(model, example, None), _affine_inputs(model, example, fire)
    reached = [name for name in repaired if name in plain and not torch.equal(plain[name], repaired[name])]
    if not reached:
        raise FireDefenseError(f"the shift at {layer} reaches no affine module (Linear, Conv, BatchNorm).")
    target = into or reached[0]
    if target not in reached:
        raise FireDefenseError(f"the shift at {layer} does not reach {target!r}; it reaches {', '.join(reached[:5])}.")
    module = model.get_submodule(target)
    change = module(repaired[target]) - module(plain[target])  # the absorbed module's output shift, per sample
    if not torch.allclose(change, change[:1].expand_as(change), atol=atol):
        raise FireDefenseError(
            f"the shift at {layer} reaches {target} differently for different inputs (a non-affine step lies between); "
            "it cannot be folded there."
        )
    per_channel = change[0] if change.ndim == 2 else change[0].flatten(1)
    if per_channel.ndim == 2 and not torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), atol=atol):
        raise FireDefenseError(
            f"the shift reaches {target} as a map that varies over positions; a bias cannot hold it."
        )
    bias_change = per_channel if per_channel.ndim == 1 else per_channel[:, 0]

    folded = copy.deepcopy(model)
    absorbing = folded.get_submodule(target)
    if absorbing.bias is None:
        absorbing.bias = nn.Parameter(torch.zeros_like(bias_change))
    absorbing.bias.add_(bias_change.to(absorbing.bias.dtype))
    difference = (folded(example) - fire(example)).abs().max()
    if difference > atol:
        raise FireDefenseError(f"folding into {target} changes the outputs by {float(difference):.2e}; not folded.")
    return folded

"""Naming the layers FIRE works at, and running a model with hooks that are always removed.

A layer is named by its dotted path in ``model.named_modules()`` (or given as the module itself,
as captum's layer methods take it). :func:`candidate_layers` finds the stage outputs of common
architectures (ResNet stages, VGG pooling stages, ViT and timm blocks, ConvNeXt stages, and
timm's ``feature_info``), which is where automatic layer choice looks.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fire_defense.errors import FireDefenseError

__all__ = ["HookHandles", "StopForward", "candidate_layers", "capture_activations", "resolve_layers", "tensor_output"]

# Stage outputs by architecture, matched at the end of a dotted module name.
_STAGE_PATTERNS = (
    r"layer\d+",  # ResNets: torchvision, timm, BackdoorBench's PreAct-ResNet
    r"encoder\.layers\.encoder_layer_\d+",  # torchvision ViT blocks
    r"blocks\.\d+",  # timm ViT / DeiT blocks
    r"stages\.\d+",  # timm ConvNeXt, RegNet, ... stages
    r"features\.denseblock\d+",  # torchvision DenseNet
)


def resolve_layers(model: nn.Module, layers: str | nn.Module | Sequence[str | nn.Module]) -> list[str]:
    """Dotted names of ``layers`` in ``model``, in the order given.

    Raises:
        FireDefenseError: a name that is not a submodule (the message lists the closest ones) or a
            module that is not part of ``model``.
    """
    items = [layers] if isinstance(layers, (str, nn.Module)) else list(layers) if isinstance(layers, Sequence) else None
    if items is None or not all(isinstance(item, (str, nn.Module)) for item in items):
        raise FireDefenseError(
            f"layers must be 'auto', a layer name, a module, or a list of them; got {layers!r:.60}. "
            "See model.named_modules() for the names."
        )
    if not items:
        raise FireDefenseError("no layers given; name at least one, or use layers='auto'.")
    names = {id(module): name for name, module in model.named_modules()}
    known = [name for name in names.values() if name]
    resolved = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in names or not names[id(item)]:
                raise FireDefenseError(
                    f"the module {type(item).__name__} given as a layer is not a submodule of the model."
                )
            resolved.append(names[id(item)])
            continue
        try:
            model.get_submodule(item)
        except AttributeError:
            close = difflib.get_close_matches(item, known, n=4, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise FireDefenseError(f"the model has no layer {item!r}.{hint} See model.named_modules().") from None
        resolved.append(item)
    if len(set(resolved)) != len(resolved):
        raise FireDefenseError(f"layers repeat: {resolved}.")
    return resolved


def candidate_layers(model: nn.Module) -> list[str]:
    """Stage outputs where a backdoor direction is looked for automatically, outermost first, in registration order.

    Raises:
        FireDefenseError: none is recognised; pass ``layers`` explicitly.
    """
    found = [
        name
        for name, _ in model.named_modules()
        if name and any(re.search(rf"(^|\.){p}$", name) for p in _STAGE_PATTERNS)
    ]
    for name, module in model.named_modules():  # VGG / AlexNet: the pooling stages of `features`
        if re.search(r"(^|\.)features\.\d+$", name) and isinstance(module, nn.MaxPool2d):
            found.append(name)
    if not found:  # timm models describe their feature stages themselves
        info = next((m.feature_info for m in model.modules() if hasattr(m, "feature_info")), None)
        prefix = next((n + "." for n, m in model.named_modules() if hasattr(m, "feature_info") and n), "")
        if info is not None:
            found = [prefix + entry["module"] for entry in info if entry.get("module")]
    if not found:
        raise FireDefenseError(
            f"no stage layers recognised in {type(model).__name__}; "
            "pass layers=[...] with names from model.named_modules()."
        )
    outermost = [name for name in dict.fromkeys(found) if not any(name.startswith(other + ".") for other in found)]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(outermost, key=order.__getitem__)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the activations it needs are captured."""


HookFn = Callable[[nn.Module, tuple, Any], torch.Tensor | None]


def tensor_output(layer: str, output: Any) -> torch.Tensor:
    """``output`` of ``layer``, which must be a tensor to be captured or repaired."""
    if not isinstance(output, torch.Tensor):
        raise FireDefenseError(f"layer {layer} returns a {type(output).__name__}, not a tensor; choose another layer.")
    return output


class HookHandles:
    """Forward hooks ``(layer name, fn)`` attached to a model together, and removed together.

    Call :meth:`remove`, or use it as a context manager; removing twice is harmless. Only these
    hooks are removed, never others on the same modules.
    """

    def __init__(self, model: nn.Module, hooks: Sequence[tuple[str, HookFn]]) -> None:
        self._handles = []
        try:
            for name, fn in hooks:
                self._handles.append(model.get_submodule(name).register_forward_hook(fn))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        """Whether the hooks are still attached."""
        return bool(self._handles)

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def capture_activations(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    layers: Sequence[str],
    sink: Callable[[str, torch.Tensor], None],
    hooks: Sequence[tuple[str, HookFn]] = (),
    outputs: list[torch.Tensor] | None = None,
) -> None:
    """Run ``batches`` through ``model`` with ``hooks`` attached and hand each activation at ``layers`` to ``sink``.

    Activations are detached and taken in inference mode; each pass stops as soon as every layer
    in ``layers`` has fired (the rest of the network is not run), unless ``outputs`` is given: then
    the passes run to the end and the model's outputs are appended to it.

    Raises:
        FireDefenseError: a layer did not run, or returned something other than a tensor.
    """
    pending: set[str] = set()

    def capture(name: str) -> HookFn:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            sink(name, tensor_output(name, output).detach())
            pending.discard(name)
            if not pending and outputs is None:
                raise StopForward

        return hook

    with torch.inference_mode(), HookHandles(model, [*hooks, *((name, capture(name)) for name in layers)]):
        for batch in batches:
            pending.update(layers)
            with contextlib.suppress(StopForward):
                output = model(batch)
                if outputs is not None:
                    outputs.append(output)
            if pending:
                raise FireDefenseError(f"layers {sorted(pending)} did not run in the model's forward pass.")

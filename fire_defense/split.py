"""The part of a model after a layer, as a module of that layer's output: a second pass that resumes there.

FIRE's target condition runs the model once unrepaired, then again, repaired, for the inputs it
selects. Everything before the first repaired layer is the same in both passes, so the second
pass can start from the activation the first one stored at that layer. :func:`split_at` builds
that rest of the model with ``torch.fx``, and the head before it, so the first pass can run as
``rest(head(x))`` and keep the layer's output without a hook: only the
``forward`` methods of the modules that contain a repaired layer are traced, every other submodule
(the repaired layers included) is called as it is, so forward hooks on the repaired layers still
fire in the suffix. Where the model cannot be split there (it does not trace, or a value computed
before the layer, such as the input itself, is used after it) there is no suffix, and the caller
runs the whole model again.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx, nn

__all__ = ["hooks_on_path", "rests_after", "split_at"]


class _AncestorTracer(fx.Tracer):
    """Traces only through the modules on the path to ``layers``; every other module is one ``call_module``."""

    def __init__(self, layers: Sequence[str]) -> None:
        super().__init__()
        parts = [layer.split(".") for layer in layers]
        self.ancestors = {".".join(names[:depth]) for names in parts for depth in range(len(names))}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name not in self.ancestors


def hooks_on_path(model: nn.Module, layers: Sequence[str]) -> bool:
    """Whether a forward hook would be skipped by a cut at ``layers``: one on ``model`` or on a module the trace
    inlines on the way to them (their ancestors), or a global one (``register_module_forward_hook``). The layers'
    own hooks, and those of every module called whole, still run in ``head`` and ``rest``."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    ancestors = {".".join(layer.split(".")[:depth]) for layer in layers for depth in range(len(layer.split(".")))}
    return any(
        (found := model.get_submodule(name))._forward_hooks or found._forward_pre_hooks for name in sorted(ancestors)
    )


def split_at(model: nn.Module, layers: Sequence[str]) -> tuple[str, fx.GraphModule, fx.GraphModule] | None:
    """``(first, head, rest)``: the first of ``layers`` that ``model`` computes, ``head(x)``, that layer's output
    from the model's input, and ``rest(h)``, the model's output from it; ``rest(head(x))`` is ``model(x)``, with
    the same operations in the same order. Both share ``model``'s submodules (their weights and hooks).

    Returns ``None`` where the model cannot be cut there (see the module docstring).
    """
    try:
        graph = _AncestorTracer(layers).trace(model)
    except Exception:  # noqa: BLE001 - fx raises many types for code it cannot trace; the caller falls back
        return None
    return _cut(model, graph, layers)


def rests_after(model: nn.Module, layers: Sequence[str]) -> dict[str, fx.GraphModule | None]:
    """``{layer: rest}`` for each of ``layers`` on its own (``rest``: as :func:`split_at`'s; ``None`` where
    the model cannot be cut there), from one trace in which every one of them is called as it is."""
    try:
        graph = _AncestorTracer(layers).trace(model)
    except Exception:  # noqa: BLE001 - as in split_at
        return dict.fromkeys(layers)
    rests = {}
    for layer in layers:
        split = _cut(model, graph, [layer], head=False)
        rests[layer] = None if split is None else split[2]
    return rests


def _cut(model: nn.Module, graph: fx.Graph, layers: Sequence[str], head: bool = True) -> tuple | None:
    """:func:`split_at` on a traced ``graph`` (``head=False``: without the head)."""
    nodes = list(graph.nodes)
    cuts = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target in layers]
    if sorted(nodes[i].target for i in cuts) != sorted(set(layers)):
        return None  # a repaired layer is called more than once, or never
    cut = cuts[0]
    before, after = set(nodes[:cut]), nodes[cut + 1 :]
    if any(used in before and used.op != "get_attr" for node in after for used in node.all_input_nodes):
        return None  # a value from before the cut (the input, a skip connection) is needed after it
    first: fx.GraphModule | None = None
    if head:
        head_graph, head_env = fx.Graph(), {}
        for node in nodes[: cut + 1]:
            head_env[node] = head_graph.node_copy(node, head_env.__getitem__)
        head_graph.output(head_env[nodes[cut]])
        first = fx.GraphModule(model, head_graph)
    rest = fx.Graph()
    env = {nodes[cut]: rest.placeholder("activation")}
    for node in after:
        for used in node.all_input_nodes:
            if used in before and used not in env:  # a parameter or constant read before the cut, used after it
                env[used] = rest.node_copy(used, env.__getitem__)
        env[node] = rest.node_copy(node, env.__getitem__)
    return str(nodes[cut].target), first, fx.GraphModule(model, rest)

"""Automatic layer choice: a function of the defender's data that returns a choice and changes nothing.

:func:`choose_layer` scores every candidate layer from statistics already gathered there, on the
defender's own inputs only (the clean reference and the ``k`` poisoned inputs seen):

- ``select="repair"`` (ours, the default): repair the candidate alone and measure the share of
  poisoned inputs moved off their majority prediction (the attack's label, as the defender can
  infer it) minus the share of ``probe_clean`` clean inputs whose prediction changed; candidates
  within ``tie`` of the best are tied, and the tie goes to the largest separation d';
- ``select="separation"``: the largest d' alone (difference of the mean projection scores of
  poisoned and clean inputs over their pooled standard deviation).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fire_defense.errors import FireDefenseError
from fire_defense.layers import HookHandles
from fire_defense.metrics import predict
from fire_defense.repair import LayerRepair, repair_hook
from fire_defense.statistics import LayerStatistics

__all__ = ["SELECTIONS", "LayerChoice", "choose_layer"]

SELECTIONS = ("repair", "separation")


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layer and every candidate's scores (``repair`` and ``separation``, or ``separation`` alone)."""

    layer: str
    scores: dict[str, dict[str, float]]


def choose_layer(
    model: nn.Module,
    statistics: Mapping[str, LayerStatistics],
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    build: Callable[[str], LayerRepair],
    select: str = "repair",
    probe_clean: int = 64,
    tie: float = 0.05,
    batch_size: int = 256,
) -> LayerChoice:
    """The candidate (a key of ``statistics``, with poisoned activations kept) that best repairs, by ``select``.

    Args:
        model: The classifier, with no repair attached.
        statistics: Each candidate's statistics, gathered without repairs elsewhere.
        clean: Clean reference inputs (the first ``probe_clean`` are used).
        poisoned: The poisoned inputs the statistics were gathered from.
        build: Makes the repair of one candidate layer.
        select: ``'repair'`` or ``'separation'`` (module docstring).
    """
    if select not in SELECTIONS:
        raise FireDefenseError(f"unknown select {select!r}; use one of {', '.join(SELECTIONS)}.")
    candidates: Sequence[str] = list(statistics)
    separation = {layer: statistics[layer].separation() for layer in candidates}
    if select == "separation":
        best = max(candidates, key=separation.__getitem__)
        return LayerChoice(best, {layer: {"separation": separation[layer]} for layer in candidates})
    probe = clean[:probe_clean]
    clean_before = predict(model, probe, batch_size)
    poisoned_before = predict(model, poisoned, batch_size)
    target = np.bincount(poisoned_before).argmax()
    repair_score = {}
    for layer in candidates:
        with HookHandles(model, [(layer, repair_hook(layer, build(layer)))]):
            moved = np.mean(predict(model, poisoned, batch_size) != target)
            disturbed = np.mean(predict(model, probe, batch_size) != clean_before)
        repair_score[layer] = float(moved - disturbed)
    near_best = [layer for layer in candidates if repair_score[layer] >= max(repair_score.values()) - tie]
    scores = {layer: {"repair": repair_score[layer], "separation": separation[layer]} for layer in candidates}
    return LayerChoice(max(near_best, key=separation.__getitem__), scores)

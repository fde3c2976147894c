"""Automatic layer choice: a function of the defender's data that returns a choice and changes nothing.

:func:`choose_layer` scores every candidate layer from statistics already gathered there, on the
defender's own inputs only (the clean reference and the ``k`` poisoned inputs seen):

- ``select="repair"`` (ours, the default): repair the candidate alone and measure the share of
  poisoned inputs moved off their majority prediction (the attack's label, as the defender can
  infer it) minus the share of ``probe_clean`` clean inputs whose prediction changed; candidates
  within ``tie`` of the best are tied, and the tie goes to the largest separation d';
- ``select="separation"``: the largest d' alone (difference of the mean projection scores of
  poisoned and clean inputs over their pooled standard deviation);
- ``select="holdout"`` (ours, FIRE v2's default): every candidate is scored on inputs its repair
  was not estimated from. Each seen poisoned input is repaired with the direction estimated from
  the other ``k - 1`` (leave-one-out; with ``k = 1``, from itself) and counts as moved if its
  prediction changed and is no inferred target; a held-out ``holdout`` share of the clean
  reference, whose clean mean is left out of the estimate, gives the share of clean predictions
  the repair changes. Only the inputs a ``condition`` selects are repaired. The score is moved
  minus changed; ties go to fewer changed clean predictions, then to the earlier layer.
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
from fire_defense.repair import LayerRepair, TargetCondition, repair_hook
from fire_defense.statistics import LayerStatistics

__all__ = ["SELECTIONS", "LayerChoice", "choose_layer"]

SELECTIONS = ("repair", "separation", "holdout")


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layer and every candidate's scores (by rule: ``repair``, ``separation``, ``holdout``, ...)."""

    layer: str
    scores: dict[str, dict[str, float]]


def choose_layer(
    model: nn.Module,
    statistics: Mapping[str, LayerStatistics],
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    build: Callable[[str, LayerStatistics], LayerRepair],
    select: str = "repair",
    probe_clean: int = 64,
    tie: float = 0.05,
    batch_size: int = 256,
    condition: TargetCondition | None = None,
    holdout: float = 0.2,
) -> LayerChoice:
    """The candidate (a key of ``statistics``, with poisoned activations kept) that best repairs, by ``select``.

    Args:
        model: The classifier, with no repair attached.
        statistics: Each candidate's statistics, gathered without repairs elsewhere.
        clean: The clean reference inputs the statistics were gathered from, in the same order.
        poisoned: The poisoned inputs the statistics were gathered from, in the same order.
        build: Makes the repair of a candidate layer from (its name, statistics).
        select: ``'repair'``, ``'separation'`` or ``'holdout'`` (module docstring).
        probe_clean: Clean inputs the ``repair`` rule scores with.
        tie: Scores this close count as a tie (``repair`` rule).
        condition: ``holdout``: repair only the inputs it selects (a fitted :class:`TargetCondition`).
        holdout: ``holdout``: share of the clean reference held out of the estimate.
    """
    if select not in SELECTIONS:
        raise FireDefenseError(f"unknown select {select!r}; use one of {', '.join(SELECTIONS)}.")
    candidates: Sequence[str] = list(statistics)
    separation = {layer: statistics[layer].separation() for layer in candidates}
    if select == "separation":
        best = max(candidates, key=separation.__getitem__)
        return LayerChoice(best, {layer: {"separation": separation[layer]} for layer in candidates})
    if select == "holdout":
        return _holdout_choice(model, statistics, clean, poisoned, build, condition, holdout, batch_size)
    probe = clean[:probe_clean]
    clean_before = predict(model, probe, batch_size)
    poisoned_before = predict(model, poisoned, batch_size)
    target = np.bincount(poisoned_before).argmax()
    repair_score = {}
    for layer in candidates:
        with HookHandles(model, [(layer, repair_hook(layer, build(layer, statistics[layer])))]):
            moved = np.mean(predict(model, poisoned, batch_size) != target)
            disturbed = np.mean(predict(model, probe, batch_size) != clean_before)
        repair_score[layer] = float(moved - disturbed)
    near_best = [layer for layer in candidates if repair_score[layer] >= max(repair_score.values()) - tie]
    scores = {layer: {"repair": repair_score[layer], "separation": separation[layer]} for layer in candidates}
    return LayerChoice(max(near_best, key=separation.__getitem__), scores)


def _holdout_choice(
    model: nn.Module,
    statistics: Mapping[str, LayerStatistics],
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    build: Callable[[str, LayerStatistics], LayerRepair],
    condition: TargetCondition | None,
    holdout: float,
    batch_size: int,
) -> LayerChoice:
    """The ``holdout`` rule (module docstring): only inputs that get repaired run through the model again."""
    n_fit = len(clean) - max(1, round(holdout * len(clean)))
    if n_fit < 1:
        raise FireDefenseError(f"select='holdout' needs a clean reference of at least 2 inputs, got {len(clean)}.")
    with torch.inference_mode():
        clean_logits = torch.cat([model(b) for b in clean[n_fit:].split(batch_size)])
        poisoned_logits = torch.cat([model(b) for b in poisoned.split(batch_size)])
    held_before, poisoned_before = clean_logits.argmax(1), poisoned_logits.argmax(1)
    if condition is None:  # every input is repaired; "moved" means changed
        clean_selected, poisoned_selected = (torch.ones(len(x), dtype=torch.bool) for x in (clean_logits, poisoned))
        targets = None
    else:
        clean_selected, poisoned_selected = condition(clean_logits).cpu(), condition(poisoned_logits).cpu()
        targets = None if bool(condition.mask.all()) else condition.mask.cpu()  # no target found: as unconditional
    scores: dict[str, dict[str, float]] = {}
    for layer in statistics:
        moved = []
        for i in poisoned_selected.nonzero().flatten().tolist():
            left_out = i if len(poisoned) > 1 else None  # one poisoned input: scored in sample
            repair = build(layer, statistics[layer].holdout(n_fit, leave_out=left_out))
            with HookHandles(model, [(layer, repair_hook(layer, repair))]):
                after = int(predict(model, poisoned[i : i + 1])[0])
            moved.append(after != int(poisoned_before[i]) and (targets is None or not bool(targets[after])))
        moved_share = (sum(moved) + int((~poisoned_selected).sum())) / len(poisoned)
        chosen = clean_selected.nonzero().flatten()
        changed = 0
        if len(chosen):
            with HookHandles(model, [(layer, repair_hook(layer, build(layer, statistics[layer].holdout(n_fit))))]):
                after_clean = predict(model, clean[n_fit:][chosen.to(clean.device)], batch_size)
            changed = int((torch.as_tensor(after_clean) != held_before.cpu()[chosen]).sum())
        disturbed = changed / len(held_before)
        scores[layer] = {"holdout": moved_share - disturbed, "moved": moved_share, "disturbed": disturbed}
    order = list(statistics)
    best = max(order, key=lambda layer: (scores[layer]["holdout"], -scores[layer]["disturbed"], -order.index(layer)))
    return LayerChoice(best, scores)

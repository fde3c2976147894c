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
  minus changed; ties go to fewer changed clean predictions, then to the earlier layer. With
  ``weight="confidence"`` (FIRE v2's default) a moved input counts its repaired prediction's
  softmax probability instead of 1: a repair that restores the input's class gives a confident
  prediction, one that only scrambles the features (a late stage) an uncertain one.
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
from fire_defense.repair import LayerRepair, TargetCondition, projection_scores, repair_hook
from fire_defense.split import hooks_on_path, rests_after
from fire_defense.statistics import LayerStatistics

__all__ = ["SELECTIONS", "WEIGHTS", "LayerChoice", "choose_layer"]

SELECTIONS = ("repair", "separation", "holdout")
WEIGHTS = ("count", "confidence")  # how the holdout rule counts a moved poisoned input


@dataclass(frozen=True)
class LayerChoice:
    """The chosen layer (and gate quantile) and every candidate's scores (by rule: ``repair``, ``holdout``, ...)."""

    layer: str
    scores: dict[str, dict[str, float]]
    quantile: float | None = None


def choose_layer(
    model: nn.Module,
    statistics: Mapping[str, LayerStatistics],
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    build: Callable[..., LayerRepair],
    select: str = "repair",
    probe_clean: int = 64,
    tie: float = 0.05,
    batch_size: int = 256,
    condition: TargetCondition | None = None,
    holdout: float = 0.2,
    quantiles: Sequence[float | None] = (None,),
    clean_logits: torch.Tensor | None = None,
    poisoned_logits: torch.Tensor | None = None,
    weight: str = "count",
) -> LayerChoice:
    """The candidate (a key of ``statistics``, with poisoned activations kept) that best repairs, by ``select``.

    Args:
        model: The classifier, with no repair attached.
        statistics: Each candidate's statistics, gathered without repairs elsewhere.
        clean: The clean reference inputs the statistics were gathered from, in the same order.
        poisoned: The poisoned inputs the statistics were gathered from, in the same order.
        build: Makes the repair of a candidate layer from (its name, statistics); the ``holdout``
            rule also passes the statistics' clean projections (as :func:`~fire_defense.repair.build_repair`
            takes them) for its leave-one-out repairs, which share one product.
        select: ``'repair'``, ``'separation'`` or ``'holdout'`` (module docstring).
        probe_clean: Clean inputs the ``repair`` rule scores with.
        tie: Scores this close count as a tie (``repair`` rule).
        condition: ``holdout``: repair only the inputs it selects (a fitted :class:`TargetCondition`).
        holdout: ``holdout``: share of the clean reference held out of the estimate.
        quantiles: ``holdout`` with a ``condition``: gate quantiles to choose from with the layer
            (:func:`gate_threshold`; ``None``: no gate).
        clean_logits, poisoned_logits: The unrepaired model's outputs on ``clean`` and
            ``poisoned``, if known (saves passes).
        weight: ``holdout``: what a moved poisoned input counts, ``'count'`` (1) or ``'confidence'``
            (the softmax probability of its repaired prediction).
    """
    if select not in SELECTIONS:
        raise FireDefenseError(f"unknown select {select!r}; use one of {', '.join(SELECTIONS)}.")
    if weight not in WEIGHTS:
        raise FireDefenseError(f"unknown holdout weight {weight!r}; use one of {', '.join(WEIGHTS)}.")
    if select == "holdout":
        with torch.inference_mode():
            logits = [
                known if known is not None else torch.cat([model(b) for b in inputs.split(batch_size)])
                for known, inputs in ((clean_logits, clean), (poisoned_logits, poisoned))
            ]
        quantiles = quantiles if condition is not None else (None,)
        return _holdout_choice(
            model, statistics, clean, poisoned, *logits, build, condition, holdout, quantiles, weight == "confidence"
        )
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
        with HookHandles(model, [(layer, repair_hook(layer, build(layer, statistics[layer])))]):
            moved = np.mean(predict(model, poisoned, batch_size) != target)
            disturbed = np.mean(predict(model, probe, batch_size) != clean_before)
        repair_score[layer] = float(moved - disturbed)
    near_best = [layer for layer in candidates if repair_score[layer] >= max(repair_score.values()) - tie]
    scores = {layer: {"repair": repair_score[layer], "separation": separation[layer]} for layer in candidates}
    return LayerChoice(max(near_best, key=separation.__getitem__), scores)


def gate_threshold(scores: torch.Tensor, selected: torch.Tensor, quantile: float | None) -> float:
    """The ``quantile`` of the clean ``scores`` of the inputs a condition ``selected``; ``-inf`` for no gate."""
    return float(_gate_thresholds(scores[:, None], selected, quantile)[0])


def _gate_thresholds(scores: torch.Tensor, selected: torch.Tensor, quantile: float | None) -> torch.Tensor:
    """:func:`gate_threshold` of each column of ``scores`` ``(N, R)`` (one repair's clean scores each): ``(R,)``."""
    if quantile is None or not bool(selected.any()):
        return torch.full((scores.shape[1],), float("-inf"), dtype=torch.float64)
    return torch.quantile(scores[selected].double(), quantile, dim=0)


def _row_by_row(layer: str, repairs: Sequence[LayerRepair]) -> Callable:
    """A forward hook at ``layer`` that repairs row ``i`` of the batch with ``repairs[i]``."""

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([repair(output[i : i + 1]) for i, repair in enumerate(repairs)])

    return hook


def _thresholds(
    repairs: Sequence[LayerRepair], products: torch.Tensor, selected: torch.Tensor, quantiles: Sequence[float | None]
) -> dict[float | None, torch.Tensor]:
    """:func:`gate_threshold` of each repair's clean scores at each quantile, ``{q: (R,)}``, from the clean
    activations' ``products`` with the repairs' first directions ``(N, R)``."""
    scores = projection_scores(repairs, products=products).cpu()
    return {q: _gate_thresholds(scores, selected, q) for q in quantiles}


def _holdout_choice(
    model: nn.Module,
    statistics: Mapping[str, LayerStatistics],
    clean: torch.Tensor,
    poisoned: torch.Tensor,
    clean_logits: torch.Tensor,
    poisoned_logits: torch.Tensor,
    build: Callable[..., LayerRepair],
    condition: TargetCondition | None,
    holdout: float,
    quantiles: Sequence[float | None],
    by_confidence: bool,
) -> LayerChoice:
    """The ``holdout`` rule (module docstring): only inputs that get repaired run through the model again."""
    n_fit = len(clean) - max(1, round(holdout * len(clean)))
    if n_fit < 1:
        raise FireDefenseError(f"select='holdout' needs a clean reference of at least 2 inputs, got {len(clean)}.")
    before = clean_logits.argmax(1).cpu()
    if condition is None:  # every input is repaired; "moved" means changed
        selected = torch.ones(len(clean), dtype=torch.bool)
        poisoned_selected = torch.ones(len(poisoned), dtype=torch.bool)
        targets = None
    else:
        selected, poisoned_selected = condition(clean_logits).cpu(), condition(poisoned_logits).cpu()
        targets = None if bool(condition.mask.all()) else condition.mask.cpu()  # no target found: as unconditional
    poisoned_before = poisoned_logits.argmax(1).cpu()
    held = torch.arange(n_fit, len(clean))
    rests = rests_after(model, list(statistics))  # the repaired passes resume after the layer where the model cuts
    scores: dict[str, dict[str, float]] = {}
    best: tuple | None = None
    for position, layer in enumerate(statistics):
        stats = statistics[layer]
        clean_acts = stats.clean_activations().view(-1, *stats.shape)
        moved = {q: float((~poisoned_selected).sum()) for q in quantiles}  # inputs left alone are no target already
        poisoned_acts = stats.poisoned_activations().view(-1, *stats.shape)
        fit_stats = stats.holdout(n_fit)
        rows = poisoned_selected.nonzero().flatten().tolist()
        # the repair scored on the held-out clean inputs, then for each row the one estimated without it
        # (k = 1: with it); they share the clean activations, so their projections are one product
        family = [fit_stats] + [fit_stats.leave_out(i) if len(poisoned) > 1 else fit_stats for i in rows]
        rank = fit_stats.unit_basis().shape[0]
        products = fit_stats.clean_activations() @ torch.cat([s.unit_basis() for s in family]).T.float()
        repair, *repairs = [build(layer, s, p) for s, p in zip(family, products.split(rank, dim=1), strict=True)]
        thresholds = _thresholds([repair, *repairs], products[:, ::rank], selected[:n_fit], quantiles)
        # the passes resume from the kept (float32) activations where the model cuts there and they are exact
        exact = stats.dtype in (torch.float32, torch.float16, torch.bfloat16)
        rest = rests[layer] if exact and not hooks_on_path(model, [layer]) else None  # else a hook would be skipped
        if rows:
            with torch.inference_mode():
                if rest is not None:
                    kept = poisoned_acts.to(stats.dtype)
                    repaired = [row_repair(kept[i : i + 1]) for i, row_repair in zip(rows, repairs, strict=True)]
                    logits = rest(torch.cat(repaired))
                else:
                    with HookHandles(model, [(layer, _row_by_row(layer, repairs))]):
                        logits = model(poisoned[torch.as_tensor(rows, device=poisoned.device)])
            confidence, after = logits.softmax(1).cpu().max(1)
            own = torch.as_tensor(rows, device=poisoned_acts.device)  # each repair's score of its own row
            row_scores = projection_scores(repairs, poisoned_acts[own]).diagonal().cpu()
            away = after != poisoned_before[rows]
            if targets is not None:
                away &= ~targets[after]
            worth = confidence.double() if by_confidence else torch.ones(len(rows), dtype=torch.float64)
            for q in quantiles:
                moved[q] += float((worth * (away & (row_scores > thresholds[q][1:]))).sum())
        candidates = held[selected[n_fit:]]
        after_clean = before[candidates]
        if len(candidates) and rest is not None:
            with torch.inference_mode():
                kept = clean_acts[candidates.to(clean_acts.device)].to(stats.dtype)
                after_clean = rest(repair(kept)).argmax(1).cpu()
        elif len(candidates):
            with HookHandles(model, [(layer, repair_hook(layer, repair))]):
                after_clean = torch.as_tensor(predict(model, clean[candidates.to(clean.device)]))
        held_scores = repair.score(clean_acts[candidates]).cpu()
        for q in quantiles:
            changed = int(((after_clean != before[candidates]) & (held_scores > thresholds[q][0])).sum())
            entry = {
                "holdout": moved[q] / len(poisoned) - changed / len(held),
                "moved": moved[q] / len(poisoned),
                "disturbed": changed / len(held),
            }
            rank = (entry["holdout"], -entry["disturbed"], -position)
            if best is None or rank > best[0]:
                best = (rank, layer, q)
            if layer not in scores or rank[:2] > (scores[layer]["holdout"], -scores[layer]["disturbed"]):
                scores[layer] = entry if q is None else {**entry, "gate_quantile": q}
    assert best is not None
    return LayerChoice(best[1], scores, best[2])

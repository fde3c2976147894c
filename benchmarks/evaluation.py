"""The one evaluation: a defense on a record under a protocol, as a row of metrics.

Every number the benchmark reports comes from :func:`evaluate`: the grid's cells
(:mod:`fire_bench.cells`), ``fire-bench fire-report`` (a grid of its own, ``grids/fire.yaml``) and
the BackdoorBench plugin (:mod:`fire_bench.backdoorbench.defense`). It fits the defense on the
defender's data only (the clean reference; its true labels, ``k`` poisoned inputs or the trigger
if the defense declares that need; the dataset's clean training split to a defense with ``use_clean_train``,
bdmae's masked autoencoder), and scores the evaluation part of the split (capped by the protocol's seeded
subsamples; ``None`` caps score all of it) with :func:`fire_defense.metrics.backdoor_outcomes`, whose
per-sample vectors the row also carries, packed (``outcomes``, :func:`fire_bench.intervals.pack_outcomes`).
:func:`with_der` adds BackdoorBench's DER against the undefended row of the same split, and each
rate's 95% interval (:func:`fire_bench.intervals.cell_intervals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from fire_adapters import ImageSet, Record, to_tensor
from fire_bench.defenses import RuntimeDefense, Trigger, create_defense
from fire_bench.grid import DefenseSpec, Protocol
from fire_bench.intervals import cell_intervals, pack_outcomes
from fire_bench.protocol import Split, describe, split_record
from fire_defense import resolve_device
from fire_defense.metrics import OUTCOME_OF, auroc, backdoor_outcomes, defense_effectiveness_rating

__all__ = ["METRICS", "Defender", "Evaluation", "defender", "evaluate", "protocol_split", "with_der"]

METRICS = ("test_acc", "test_asr", "test_ra")
"""The three numbers every output reports (BackdoorBench's names), as fractions."""


def protocol_split(record: Record, protocol: Protocol, seed: int) -> Split:
    """The protocol's division of ``record`` under ``seed`` (:func:`fire_bench.protocol.split_record`)."""
    return split_record(record, seed=seed, clean_size=protocol.clean_size, defender_share=protocol.defender_share)


def _subsample(images: ImageSet, size: int | None, seed: int) -> ImageSet:
    if size is None or size >= len(images):
        return images
    return images.subset(np.sort(np.random.default_rng(seed).choice(len(images), size=size, replace=False)))


def _trigger(record: Record) -> Trigger:
    """The record's true trigger on ``[0, 1]`` tensors (records made by our factory carry its parameters)."""
    from fire_adapters.factory import load_attack
    from fire_adapters.preprocess import to_uint8

    attack = load_attack(record)
    return lambda x: to_tensor(attack(to_uint8(x)), x.device)


@dataclass(frozen=True)
class Defender:
    """What a defense is fitted with: the record's classifier and the defender's data it declared it needs."""

    classifier: nn.Module
    clean: torch.Tensor
    poisoned: torch.Tensor | None
    trigger: Trigger | None
    clean_labels: torch.Tensor | None = None  # the clean reference's true labels ("labels" in needs)
    clean_train: np.ndarray | None = None  # the dataset's clean training split, for a defense with use_clean_train

    def fit(self, defense: RuntimeDefense) -> RuntimeDefense:
        """``defense`` fitted on this data (and returned)."""
        if self.clean_train is not None:
            defense.use_clean_train(self.clean_train)  # type: ignore[attr-defined]  # e.g. bdmae trains its MAE on it
        return defense.fit(
            self.classifier, self.clean, poisoned=self.poisoned, trigger=self.trigger, clean_labels=self.clean_labels
        )

    @property
    def inputs(self) -> torch.Tensor:
        """Every input the defense is given: the clean reference, then the poisoned inputs if any."""
        return self.clean if self.poisoned is None else torch.cat([self.clean, self.poisoned])


def defender(
    record: Record, split: Split, defense: RuntimeDefense, protocol: Protocol, device: torch.device
) -> Defender:
    """The defender's side of ``split`` for ``defense`` on ``device`` (``protocol.k`` poisoned inputs; the clean
    reference's labels, known since it is drawn from the clean training split, only to a defense that needs them;
    the dataset's clean training split, never the test split, only to a defense with ``use_clean_train``)."""
    return Defender(
        record.classifier().to(device),
        to_tensor(split.clean_reference.images, device),
        to_tensor(split.poisoned_inputs(protocol.k).images, device) if "poisoned" in defense.needs else None,
        _trigger(record) if "trigger" in defense.needs else None,
        torch.as_tensor(split.clean_reference.labels, device=device) if "labels" in defense.needs else None,
        record.load_clean_train().images if hasattr(defense, "use_clean_train") else None,
    )


class Evaluation(NamedTuple):
    """:func:`evaluate`'s answer: the row of metrics, and the fitted defense."""

    row: dict[str, Any]
    defense: RuntimeDefense


def evaluate(
    record: Record,
    split: Split,
    defense: DefenseSpec,
    protocol: Protocol,
    device: torch.device | str | None = None,
) -> Evaluation:
    """``defense`` fitted on ``split``'s defender data, scored on its evaluation part (module docstring).

    Args:
        record: The record (its classifier is moved to ``device``).
        split: Its defender/evaluation division (:func:`protocol_split`, or the plugin's own clean data);
            ``split.seed`` also seeds the defense and the evaluation subsamples.
        defense: Which defense, with its parameters and the label the row carries.
        protocol: ``k`` (poisoned inputs the defender sees) and the evaluation caps.

    Returns:
        The row (``test_acc``, ``test_asr``, ``test_ra``; ``tpr``, ``fpr`` for a detector; ``auroc`` where
        the defense scores; what it is and where it acts; ``outcomes``, the per-sample outcomes the intervals
        resample) and the fitted defense.
    """
    device = resolve_device(device)
    scored = replace(
        split,
        clean_eval=_subsample(split.clean_eval, protocol.eval_clean, split.seed),
        poisoned_eval=_subsample(split.poisoned_eval, protocol.eval_poisoned, split.seed + 1),
    )
    fitted = create_defense(defense.name, seed=split.seed, **defense.params)
    defender(record, split, fitted, protocol, device).fit(fitted)
    clean, poisoned = scored.clean_eval, scored.poisoned_eval
    on_clean, on_poisoned = fitted.decide(to_tensor(clean.images)), fitted.decide(to_tensor(poisoned.images))
    predicted_clean, predicted_poisoned = on_clean.labels.numpy(), on_poisoned.labels.numpy()
    outcomes = backdoor_outcomes(predicted_clean, clean.labels, predicted_poisoned, poisoned.labels, poisoned.targets)
    rates = {metric: float(np.mean(outcomes[OUTCOME_OF[metric]])) for metric in OUTCOME_OF}
    layers = getattr(fitted, "layers_", None)
    setting = getattr(fitted, "setting_", "")  # what a defense chose on defender data, in words
    row: dict[str, Any] = {
        "record": record.path.name,
        "dataset": record.dataset.name,
        "backbone": record.model_name,
        "attack_name": str(record.metadata.get("attack", record.path.name)),
        "ratio": record.metadata.get("pratio", record.metadata.get("attack_params", {}).get("ratio", "")),
        "seed": split.seed,
        "defense_name": defense.label,
        "defense": defense.name,
        "params": defense.params,
        "k": protocol.k,
        **{metric: rates[metric] for metric in METRICS},
        "rejects": fitted.rejects,
        "forward_passes": fitted.forward_passes,
        "layers": ",".join(layers) if layers else "",
        "setting": setting,
        "split": describe(scored),
    }
    if fitted.rejects:
        row["tpr"], row["fpr"] = rates["tpr"], rates["fpr"]
    if on_clean.scores is not None and on_poisoned.scores is not None:
        row["auroc"] = auroc(on_clean.scores.numpy(), on_poisoned.scores.numpy())
    row["outcomes"] = pack_outcomes(outcomes, clean.indices, poisoned.indices)
    return Evaluation(row, fitted)


def with_der(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with ``der``: BackdoorBench's DER against the undefended (``none``) row of the same record and
    evaluation part, ``None`` where there is no such row; and each rate's 95% interval within the cell
    (``<metric>_ci_low`` / ``_ci_high``, :func:`fire_bench.intervals.cell_intervals`; DER's paired with that row)."""
    undefended = {(r["record"], r["split"]): r for r in rows if r["defense"] == "none"}
    out = []
    for row in rows:
        base = undefended.get((row["record"], row["split"]))
        der = None
        if base is not None:
            der = defense_effectiveness_rating(base["test_asr"], row["test_asr"], base["test_acc"], row["test_acc"])
        out.append({**row, "der": der, **cell_intervals(row, base)})
    return out

"""Backdoor evaluation: predictions in batches, and the metrics every part of the project reports.

One implementation, so the attack's own numbers, FIRE's and every baseline's are computed the
same way: clean accuracy (``test_acc``), attack success rate (``test_asr``: poisoned inputs
classified as the attacker's target) and robust accuracy (``test_ra``: poisoned inputs classified
as their true label), with BackdoorBench's names, plus BackdoorBench's DER.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fire_defense.errors import FireDefenseError

__all__ = [
    "OUTCOME_OF",
    "REJECTED",
    "auroc",
    "backdoor_metrics",
    "backdoor_outcomes",
    "defense_effectiveness_rating",
    "predict",
]

REJECTED = -1
"""The label a detecting defense returns for an input it refuses to classify."""

OUTCOME_OF = {
    "test_acc": "clean_correct",
    "test_asr": "poisoned_target",
    "test_ra": "poisoned_label",
    "tpr": "poisoned_rejected",
    "fpr": "clean_rejected",
}
"""Each reported rate and the :func:`backdoor_outcomes` vector it is the mean of."""


@torch.inference_mode()
def predict(
    classifier: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Arg-max labels of ``classifier`` on ``inputs``, computed in batches.

    Args:
        classifier: Maps a batch to logits ``(N, classes)``.
        inputs: The whole input set ``(N, ...)``; batches are moved to ``device``.
        batch_size: Inputs per forward pass.
        device: Where the classifier runs (default: where ``inputs`` are).

    Returns:
        ``(N,)`` int64 labels.
    """
    if batch_size < 1:
        raise FireDefenseError(f"batch_size must be positive, got {batch_size}.")
    labels = [
        classifier(inputs[start : start + batch_size].to(device or inputs.device)).argmax(dim=1).cpu()
        for start in range(0, len(inputs), batch_size)
    ]
    return torch.cat(labels).numpy().astype(np.int64) if labels else np.empty(0, dtype=np.int64)


def backdoor_outcomes(
    clean_predictions: np.ndarray,
    clean_labels: np.ndarray,
    poisoned_predictions: np.ndarray,
    poisoned_labels: np.ndarray,
    poisoned_targets: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-sample boolean outcomes, whose means are :func:`backdoor_metrics` and a detector's TPR / FPR.

    Returns:
        ``clean_correct`` and ``clean_rejected`` (one per clean sample), ``poisoned_target``,
        ``poisoned_label`` and ``poisoned_rejected`` (one per poisoned sample).

    Raises:
        FireDefenseError: empty sets, or arrays of different lengths.
    """
    pairs = {"clean": (clean_predictions, clean_labels), "poisoned": (poisoned_predictions, poisoned_labels)}
    for name, (predictions, labels) in pairs.items():
        if len(predictions) == 0 or len(predictions) != len(labels):
            raise FireDefenseError(
                f"{name} predictions ({len(predictions)}) and labels ({len(labels)}) must be non-empty and match."
            )
    if len(poisoned_targets) != len(poisoned_labels):
        raise FireDefenseError("poisoned targets and labels must have the same length.")
    clean, poisoned = np.asarray(clean_predictions), np.asarray(poisoned_predictions)
    return {
        "clean_correct": clean == np.asarray(clean_labels),
        "clean_rejected": clean == REJECTED,
        "poisoned_target": poisoned == np.asarray(poisoned_targets),
        "poisoned_label": poisoned == np.asarray(poisoned_labels),
        "poisoned_rejected": poisoned == REJECTED,
    }


def backdoor_metrics(
    clean_predictions: np.ndarray,
    clean_labels: np.ndarray,
    poisoned_predictions: np.ndarray,
    poisoned_labels: np.ndarray,
    poisoned_targets: np.ndarray,
) -> dict[str, float]:
    """``test_acc``, ``test_asr`` and ``test_ra`` as fractions in [0, 1]: the means of :func:`backdoor_outcomes`.

    A rejected prediction (:data:`REJECTED`) counts as wrong for accuracy and as no attack success.

    Raises:
        FireDefenseError: empty sets, or arrays of different lengths.
    """
    outcomes = backdoor_outcomes(
        clean_predictions, clean_labels, poisoned_predictions, poisoned_labels, poisoned_targets
    )
    return {metric: float(np.mean(outcomes[OUTCOME_OF[metric]])) for metric in ("test_acc", "test_asr", "test_ra")}


def defense_effectiveness_rating(
    asr_before: float | np.ndarray,
    asr_after: float | np.ndarray,
    acc_before: float | np.ndarray,
    acc_after: float | np.ndarray,
) -> float | np.ndarray:
    """BackdoorBench's DER = (max(0, ASR drop) - max(0, accuracy drop) + 1) / 2, in [0, 1].

    Floats give a float; arrays (e.g. bootstrap replicates) give the element-wise array.
    """
    asr_drop, acc_drop = np.subtract(asr_before, asr_after), np.subtract(acc_before, acc_after)
    der = (np.maximum(0.0, asr_drop) - np.maximum(0.0, acc_drop) + 1.0) / 2.0
    return float(der) if np.ndim(der) == 0 else der


def auroc(negative_scores: np.ndarray, positive_scores: np.ndarray) -> float:
    """Area under the ROC curve of scores meant to be higher on positives: P(positive > negative), ties count 1/2.

    Computed exactly as the Mann-Whitney U statistic over all pairs.
    """
    negative, positive = np.asarray(negative_scores, float).ravel(), np.asarray(positive_scores, float).ravel()
    if len(negative) == 0 or len(positive) == 0:
        raise FireDefenseError("AUROC needs at least one negative and one positive score.")
    ordered = np.sort(negative)
    below = np.searchsorted(ordered, positive, side="left")
    ties = np.searchsorted(ordered, positive, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(negative) * len(positive)))

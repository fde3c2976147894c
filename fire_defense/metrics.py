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

__all__ = ["REJECTED", "auroc", "backdoor_metrics", "defense_effectiveness_rating", "predict"]

REJECTED = -1
"""The label a detecting defense returns for an input it refuses to classify."""


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


def backdoor_metrics(
    clean_predictions: np.ndarray,
    clean_labels: np.ndarray,
    poisoned_predictions: np.ndarray,
    poisoned_labels: np.ndarray,
    poisoned_targets: np.ndarray,
) -> dict[str, float]:
    """``test_acc``, ``test_asr`` and ``test_ra`` as fractions in [0, 1].

    A rejected prediction (:data:`REJECTED`) counts as wrong for accuracy and as no attack success.

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
    return {
        "test_acc": float(np.mean(np.asarray(clean_predictions) == np.asarray(clean_labels))),
        "test_asr": float(np.mean(np.asarray(poisoned_predictions) == np.asarray(poisoned_targets))),
        "test_ra": float(np.mean(np.asarray(poisoned_predictions) == np.asarray(poisoned_labels))),
    }


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """BackdoorBench's DER = (max(0, ASR drop) - max(0, accuracy drop) + 1) / 2, in [0, 1]."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1.0) / 2.0


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

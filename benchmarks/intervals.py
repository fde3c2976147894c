"""95% intervals for every reported rate: Wilson's within a cell, a paired bootstrap for DER, a t-interval across cells.

Within a cell (one defense on one record under one protocol seed), :func:`cell_intervals` gives each
rate (``test_acc``, ``fpr`` on the clean part; ``test_asr``, ``test_ra``, ``tpr`` on the poisoned part)
Wilson's score interval, which keeps a width at 0 and 1 (0 of 500 reads [0, 0.77%]). DER, a function
of four rates of two rows, gets a percentile bootstrap over the evaluation samples: :data:`RESAMPLES`
resamples with replacement of the clean part and, drawn separately, of the poisoned part, each
seeded by a digest of the sample indices it scored, so the same samples always get the same
resamples. It is paired: the defended row and the undefended row of the same record and split
scored the same samples in the same order (checked: their digests must match), so one resample
takes the same positions of both. What the bootstrap needs travels in
the row as ``outcomes`` (:func:`pack_outcomes`: each per-sample boolean outcome as packed bits in
base64, and each part's digest), which no table shows.

Across cells (protocol seeds, record seeds), :func:`across_cells` gives the mean and the t-interval
over the cell values, widened where needed to the interval the cells' own sampling noise alone
gives the mean (their half-widths added in quadrature, over the number of cells): with two or
three seeds the spread of the values can fall below the noise each of them is known to carry.
One cell keeps its bootstrap interval. Bounds are fractions, clipped to [0, 1].
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fire_defense import FireDefenseError
from fire_defense.metrics import OUTCOME_OF, defense_effectiveness_rating

__all__ = [
    "INTERVAL_METRICS",
    "LEVEL",
    "RESAMPLES",
    "across_cells",
    "cell_intervals",
    "half_width",
    "mean_over_rows",
    "pack_outcomes",
    "t_quantile",
    "unpack_outcomes",
    "wilson",
]

RESAMPLES = 2000
"""Bootstrap resamples per part of a cell."""
LEVEL = 0.95  # the t quantiles below are for this level
SEED = 0
"""Mixed with each part's sample digest to seed its resamples."""
INTERVAL_METRICS = ("test_acc", "test_asr", "test_ra", "der", "tpr", "fpr")
"""The columns that get ``<metric>_ci_low`` / ``<metric>_ci_high``."""

_PARTS = {"clean": ("correct", "rejected"), "poisoned": ("target", "label", "rejected")}
_CHUNK = 250  # resamples drawn at once
# t quantiles at 0.975 for 1..30 degrees of freedom (standard tables); beyond, a Cornish-Fisher expansion
# fmt: off
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# fmt: on


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]


def pack_outcomes(
    outcomes: Mapping[str, np.ndarray], clean_indices: np.ndarray, poisoned_indices: np.ndarray
) -> dict[str, Any]:
    """A row's ``outcomes``: :func:`fire_defense.metrics.backdoor_outcomes` packed as bits (base64), with the
    number of samples and a digest of the indices (in order) of each evaluation part, as JSON-ready values."""
    packed: dict[str, Any] = {}
    for part, indices in (("clean", clean_indices), ("poisoned", poisoned_indices)):
        entry: dict[str, Any] = {"n": len(indices), "samples": _digest(indices)}
        for name in _PARTS[part]:
            flags = np.asarray(outcomes[f"{part}_{name}"], dtype=bool)
            if len(flags) != len(indices):
                raise FireDefenseError(f"{part}_{name} has {len(flags)} outcomes for {len(indices)} samples.")
            entry[name] = base64.b64encode(np.packbits(flags).tobytes()).decode("ascii")
        packed[part] = entry
    return packed


def unpack_outcomes(row: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    """The boolean vectors of a row's ``outcomes`` (keys as :func:`fire_defense.metrics.backdoor_outcomes`),
    ``None`` for a row without them.

    Raises:
        FireDefenseError: the outcomes are damaged, or their means are not the row's metrics.
    """
    packed = row.get("outcomes")
    if packed is None:
        return None
    vectors: dict[str, np.ndarray] = {}
    try:
        for part, names in _PARTS.items():
            n = int(packed[part]["n"])
            for name in names:
                bits = np.frombuffer(base64.b64decode(packed[part][name], validate=True), dtype=np.uint8)
                if len(bits) != (n + 7) // 8:
                    raise ValueError(f"{part}.{name} holds {8 * len(bits)} bits for {n} samples")
                vectors[f"{part}_{name}"] = np.unpackbits(bits, count=n).astype(bool)
    except (KeyError, TypeError, ValueError) as error:
        raise FireDefenseError(
            f"the outcomes of {_name(row)} are damaged ({error}); delete its cache file and run again."
        ) from None
    for metric, vector in OUTCOME_OF.items():
        if row.get(metric) is not None and not math.isclose(vectors[vector].mean(), row[metric], abs_tol=1e-9):
            raise FireDefenseError(
                f"the outcomes of {_name(row)} do not give its {metric} ({row[metric]}); delete its cache file and "
                "run again."
            )
    return vectors


def _name(row: Mapping[str, Any]) -> str:
    return f"the {row.get('defense_name')!r} row of {row.get('record')!r} (seed {row.get('seed')})"


@functools.lru_cache(maxsize=2)  # a split's two parts: rows come split by split
def _counts(samples: str, n: int) -> np.ndarray:
    """``(RESAMPLES, n)`` float32: how often each position is drawn in each resample, seeded by ``samples``."""
    rng = np.random.default_rng([SEED, int(samples, 16)])
    counts = np.empty((RESAMPLES, n), dtype=np.float32)
    for start in range(0, RESAMPLES, _CHUNK):
        size = min(_CHUNK, RESAMPLES - start)
        drawn = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts[start : start + size] = np.bincount(drawn.ravel(), minlength=size * n).reshape(size, n)
    return counts


def _resampled(flags: Sequence[np.ndarray], samples: str) -> np.ndarray:
    """``(RESAMPLES, len(flags))``: each vector's mean in each resample of its part (the same positions for all)."""
    stacked = np.stack(flags, axis=1).astype(np.float32)
    return (_counts(samples, len(stacked)) @ stacked).astype(np.float64) / len(stacked)


def _bounds(replicates: np.ndarray) -> tuple[float, float]:
    low, high = np.quantile(replicates, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def wilson(share: float, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion ``share`` observed on ``n`` samples."""
    z = 1.959964
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell_intervals(row: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, float]:
    """``<metric>_ci_low`` / ``<metric>_ci_high`` of one cell (module docstring): ``test_acc``, ``test_asr``,
    ``test_ra``; ``tpr`` and ``fpr`` where the row has them; ``der`` against ``base``, the undefended row of the
    same record and split, where given. Empty for a row without ``outcomes``.

    Raises:
        FireDefenseError: ``base`` scored other samples, or in another order, than ``row``; damaged outcomes.
    """
    vectors = unpack_outcomes(row)
    if vectors is None:
        return {}
    packed = row["outcomes"]
    base_vectors = None if base is None else unpack_outcomes(base)
    if base is not None and base_vectors is not None:
        for part in _PARTS:
            if base["outcomes"][part]["samples"] != packed[part]["samples"]:
                raise FireDefenseError(
                    f"{_name(row)} and its undefended row scored different {part} samples (or in another order), "
                    "so DER cannot be paired; evaluate both on the same split and protocol."
                )
    rates = {"test_acc": "clean_correct", "test_asr": "poisoned_target", "test_ra": "poisoned_label"}
    if row.get("tpr") is not None:
        rates.update(tpr="poisoned_rejected", fpr="clean_rejected")
    out: dict[str, float] = {}
    for metric, vector in rates.items():
        out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = wilson(float(vectors[vector].mean()), len(vectors[vector]))
    if base_vectors is not None:
        on_clean = _resampled([vectors["clean_correct"], base_vectors["clean_correct"]], packed["clean"]["samples"])
        on_poisoned = _resampled(
            [vectors["poisoned_target"], base_vectors["poisoned_target"]], packed["poisoned"]["samples"]
        )
        der = defense_effectiveness_rating(on_poisoned[:, 1], on_poisoned[:, 0], on_clean[:, 1], on_clean[:, 0])
        out["der_ci_low"], out["der_ci_high"] = _bounds(der)
    return out


def t_quantile(df: int) -> float:
    """Student's t quantile at 0.975 with ``df`` >= 1 degrees of freedom (to about 1e-3)."""
    if df < 1:
        raise FireDefenseError(f"a t quantile needs at least 1 degree of freedom, got {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def half_width(value: float, low: float, high: float) -> float:
    """The larger side of an interval around ``value``: ``value +- half_width`` covers ``[low, high]``."""
    return max(high - value, value - low)


def across_cells(
    values: Sequence[float], lows: Sequence[float | None], highs: Sequence[float | None]
) -> tuple[float, float | None, float | None]:
    """The mean of the cells' ``values`` and its interval (module docstring); ``None`` bounds where a cell has no
    interval.

    Raises:
        FireDefenseError: no values, or bounds that do not match them.
    """
    if not values or len(lows) != len(values) or len(highs) != len(values):
        raise FireDefenseError(f"{len(values)} values with {len(lows)} lows and {len(highs)} highs; give one each.")
    mean = float(np.mean(values))
    if any(b is None for b in (*lows, *highs)):
        return mean, None, None
    if len(values) == 1:
        return mean, float(lows[0]), float(highs[0])  # type: ignore[arg-type]
    m = len(values)
    spread = t_quantile(m - 1) * float(np.std(values, ddof=1)) / math.sqrt(m)
    noise = math.sqrt(sum(half_width(v, lo, hi) ** 2 for v, lo, hi in zip(values, lows, highs, strict=True))) / m  # type: ignore[arg-type]
    h = max(spread, noise)
    return mean, max(0.0, mean - h), min(1.0, mean + h)


def mean_over_rows(
    values: Sequence[float], lows: Sequence[float | None], highs: Sequence[float | None]
) -> tuple[float, float | None]:
    """The mean of rows that are a fixed set (a defense's attacks) and its half-width: the rows' half-widths added in
    quadrature over their number (independent errors); ``None`` where a row has no interval.

    Raises:
        FireDefenseError: no values.
    """
    if not values:
        raise FireDefenseError("a mean over rows needs at least one row.")
    mean = float(np.mean(values))
    if any(b is None for b in (*lows, *highs)):
        return mean, None
    widths = [half_width(v, lo, hi) for v, lo, hi in zip(values, lows, highs, strict=True)]  # type: ignore[arg-type]
    return mean, math.sqrt(sum(w * w for w in widths)) / len(widths)

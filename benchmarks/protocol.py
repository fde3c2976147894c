"""The evaluation protocol: what the defender may see, and what it is scored on, never overlapping.

From a record, with a seed:

- the defender's **clean reference**: ``clean_size`` *labelled* samples of the clean *training*
  split (BackdoorBench's convention: defenses get labelled clean training data; a defense that
  lists ``"labels"`` in its ``needs`` is given their true labels), none of those the record says
  the attack poisoned (a record with no fixed poisoned set, e.g. Input-aware's, excludes none);
  or ``int(clean_ratio * len(train))`` of them (BackdoorBench's ``--ratio``); or exactly the
  samples at ``clean_indices`` (its ``--index``: their clean images, whatever the attack did to
  its copy; nothing is drawn then, so the test split's shuffle is the seed's first draw);
- the test split's indices are shuffled and cut: a ``defender_share`` part is the defender's
  **poisoned pool** (the poisoned test samples at those indices: what it may observe in operation,
  where its ``k`` poisoned inputs come from), the rest is the **evaluation** part (clean and
  poisoned test samples at those indices: what every defense is scored on).

So no evaluation image, clean or poisoned, is ever seen by a defense while it is fitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fire_adapters import ImageSet, Record
from fire_defense import FireDefenseError

__all__ = ["Split", "describe", "split_record"]


@dataclass(frozen=True)
class Split:
    """A record's data, divided between the defender and the evaluation."""

    clean_reference: ImageSet
    poisoned_pool: ImageSet
    clean_eval: ImageSet
    poisoned_eval: ImageSet
    seed: int

    def poisoned_inputs(self, k: int, seed: int | None = None) -> ImageSet:
        """``k`` poisoned samples from the defender's pool, drawn with ``seed`` (default: the split's).

        The draws are nested: the ``k`` inputs are the first ``k`` of one seeded order of the pool, so a
        larger ``k`` sees the same inputs first, then more (a stream, as the k-curve needs).
        """
        if not 0 < k <= len(self.poisoned_pool):
            raise FireDefenseError(
                f"k must be in 1..{len(self.poisoned_pool)} (the defender's poisoned pool), got {k}."
            )
        rng = np.random.default_rng(self.seed if seed is None else seed)
        return self.poisoned_pool.subset(rng.permutation(len(self.poisoned_pool))[:k])


def split_record(
    record: Record,
    seed: int = 0,
    clean_size: int = 500,
    defender_share: float = 0.1,
    *,
    clean_ratio: float | None = None,
    clean_indices: Sequence[int] | np.ndarray | None = None,
) -> Split:
    """Divide ``record``'s data as the module docstring says.

    ``clean_indices`` or ``clean_ratio`` (BackdoorBench's ``--index`` / ``--ratio``), if given, replaces ``clean_size``.
    """
    if not 0 < defender_share < 1:
        raise FireDefenseError(f"defender_share must be in (0, 1), got {defender_share}.")
    if clean_indices is not None and clean_ratio is not None:
        raise FireDefenseError("give clean_indices or clean_ratio, not both.")
    if clean_ratio is not None and not 0 < clean_ratio <= 1:
        raise FireDefenseError(f"clean_ratio must be in (0, 1], got {clean_ratio}.")
    rng = np.random.default_rng(seed)
    train = record.load_clean_train()
    poisoned_train = np.asarray([] if record.train_poison_indices is None else record.train_poison_indices)
    if len(poisoned_train) and (poisoned_train.min() < 0 or poisoned_train.max() >= len(train)):
        raise FireDefenseError(
            f"{record.path} lists poisoned training indices beyond the {len(train)}-sample training split found."
        )
    eligible = np.setdiff1d(np.arange(len(train)), poisoned_train)
    if clean_ratio is not None:
        clean_size = int(clean_ratio * len(train))
    if clean_indices is None and clean_size > len(eligible):
        raise FireDefenseError(f"clean_size {clean_size} exceeds the {len(eligible)} clean training samples.")
    reference = train.subset(
        np.sort(rng.choice(eligible, size=clean_size, replace=False))
        if clean_indices is None
        else _checked_indices(clean_indices, len(train))
    )
    order = rng.permutation(len(record.clean_test))
    defender = np.sort(order[: round(defender_share * len(order))])
    evaluation = np.sort(order[len(defender) :])
    poisoned = record.poisoned_test
    in_defender = np.isin(poisoned.indices, defender)
    return Split(
        clean_reference=reference,
        poisoned_pool=poisoned.subset(np.flatnonzero(in_defender)),
        clean_eval=record.clean_test.subset(evaluation),
        poisoned_eval=poisoned.subset(np.flatnonzero(~in_defender)),
        seed=seed,
    )


def _checked_indices(indices: Sequence[int] | np.ndarray, train_size: int) -> np.ndarray:
    """``clean_indices`` as sorted int64 positions; refused if empty, not integers, repeated or out of range."""
    array = np.asarray(indices).reshape(-1)
    if not len(array) or not np.issubdtype(array.dtype, np.integer):
        raise FireDefenseError(f"clean_indices must be a non-empty list of integers (got {len(array)} {array.dtype}).")
    if array.min() < 0 or array.max() >= train_size or len(np.unique(array)) != len(array):
        raise FireDefenseError(
            f"clean_indices must be distinct positions in the {train_size}-sample training split "
            f"(got {len(array)} in {array.min()}..{array.max()})."
        )
    return np.sort(array).astype(np.int64)


def describe(split: Split) -> str:
    """One line stating the split, for every output."""
    return (
        f"defender: {len(split.clean_reference)} clean training samples + a pool of {len(split.poisoned_pool)} "
        f"poisoned test samples; evaluation: {len(split.clean_eval)} clean and {len(split.poisoned_eval)} poisoned "
        f"test samples at disjoint indices (seed {split.seed})"
    )

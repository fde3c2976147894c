"""The benchmark's protocol never lets a defense see what it is scored on; FIRE's report runs end to end."""

from __future__ import annotations

import numpy as np
import pytest

from fire_adapters import load_record
from fire_bench.fire_report import write_report
from fire_bench.protocol import describe, split_record
from fire_defense import FireDefenseError

from helpers import write_fake_record


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_record(write_fake_record(tmp_path_factory.mktemp("bb"), n_train=700, n_test=400))


def test_defender_and_evaluation_indices_are_disjoint(record):
    split = split_record(record, seed=3, clean_size=100, defender_share=0.25)
    pool, clean_eval, poisoned_eval = (
        set(s.indices.tolist()) for s in (split.poisoned_pool, split.clean_eval, split.poisoned_eval)
    )
    assert not pool & clean_eval and not pool & poisoned_eval
    assert poisoned_eval <= clean_eval  # every evaluated poisoned image's clean twin is evaluated too
    assert len(clean_eval) == 300 and len(pool) + len(poisoned_eval) == len(record.poisoned_test)
    reference = split.clean_reference.indices
    assert len(reference) == 100 and not set(reference.tolist()) & set(record.train_poison_indices.tolist())
    chosen = split.poisoned_inputs(5)
    assert set(chosen.indices.tolist()) <= pool and len(chosen) == 5
    assert "disjoint indices (seed 3)" in describe(split)


def test_the_split_is_seeded(record):
    a, b, c = (split_record(record, seed=s, clean_size=50) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.poisoned_pool.indices, b.poisoned_pool.indices)
    np.testing.assert_array_equal(a.clean_reference.indices, b.clean_reference.indices)
    np.testing.assert_array_equal(a.poisoned_inputs(3).indices, b.poisoned_inputs(3).indices)
    assert not np.array_equal(a.poisoned_pool.indices, c.poisoned_pool.indices)


def test_bad_protocol_arguments(record):
    with pytest.raises(FireDefenseError, match="clean_size 5000 exceeds"):
        split_record(record, clean_size=5000)
    with pytest.raises(FireDefenseError, match=r"k must be in 1\.\."):
        split_record(record, clean_size=50).poisoned_inputs(10**6)


def test_fire_report_runs_end_to_end(record, tmp_path):
    out = write_report([record.path], tmp_path / "fire", k=5, ks=(1, 3), seed=0, repeats=1)
    table = (out / "mitigation.md").read_text()
    assert "fire-gate" in table and "fire-shift" in table and "none" in table
    assert (out / "k_curve.png").stat().st_size > 0 and "1.layer" in (out / "k_curve.csv").read_text()
    rows = [line.split(",") for line in (out / "k_curve.csv").read_text().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == [1, 3]
    assert "505 inputs" in (out / "estimation.md").read_text()

"""The benchmark's protocol never lets a defense see what it is scored on; FIRE's report is a view of its grid."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from fire_adapters import load_record
from fire_bench.__main__ import main
from fire_bench.grid import GRIDS_DIR
from fire_bench.protocol import describe, split_record
from fire_defense import FireDefenseError
from fire_defense.metrics import defense_effectiveness_rating

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
    np.testing.assert_array_equal(a.poisoned_inputs(3).indices, a.poisoned_inputs(7).indices[:3])  # nested: a stream
    assert not np.array_equal(a.poisoned_pool.indices, c.poisoned_pool.indices)


def test_bad_protocol_arguments(record):
    with pytest.raises(FireDefenseError, match="clean_size 5000 exceeds"):
        split_record(record, clean_size=5000)
    with pytest.raises(FireDefenseError, match=r"k must be in 1\.\."):
        split_record(record, clean_size=50).poisoned_inputs(10**6)


def test_fire_report_is_the_fire_grid_and_its_view(record, tmp_path, capsys):
    shipped = yaml.safe_load((GRIDS_DIR / "fire.yaml").read_text())
    grid = tmp_path / "fire.yaml"  # the shipped grid, its k-curve and latency scaled to the small record
    latency = {"batch_sizes": [1, 4], "rounds": 2, "min_seconds": 0.001}
    grid.write_text(yaml.safe_dump({**shipped, "k_curve": {"ks": [1, 3]}, "latency": latency}))
    out = tmp_path / "fire"
    command = ["fire-report", "--records", str(record.path.parent), "--out", str(out), "--grid", str(grid)]
    assert main([*command, "--k", "5", "--workers", "1"]) == 0
    assert "choice" in capsys.readouterr().out
    labels = [d.get("label", d["name"]) for d in shipped["defenses"]]

    cells = {c["defense_name"]: c for c in json.loads((out / "cells.json").read_text()) if c["table"] != "k_curve"}
    with open(out / "mitigation.csv") as handle:
        mitigation = list(csv.DictReader(handle))
    assert [r["defense_name"] for r in mitigation] == labels
    none = cells["none"]
    for row in mitigation:  # the view shows the grid's cells, with DER against the undefended cell
        cell = cells[row["defense_name"]]
        assert float(row["test_asr"]) == cell["test_asr"] and int(row["k"]) == 5 == cell["k"]
        der = defense_effectiveness_rating(none["test_asr"], cell["test_asr"], none["test_acc"], cell["test_acc"])
        assert float(row["der"]) == pytest.approx(der) and (
            row["setting"].startswith("1.layer") or row["defense_name"] == "none"
        )
    with open(out / "k_curve.csv") as handle:
        assert [int(r["k"]) for r in csv.DictReader(handle)] == [1, 3]
    assert (out / "k_curve.png").stat().st_size > 0 and (out / "leaderboard.md").is_file()
    estimation = (out / "estimation.md").read_text()
    assert all(f"| {label} |" in estimation for label in labels[1:])
    with open(out / "choice.csv") as handle:  # FIRE's own choice beside the best fixed setting in hindsight
        (choice,) = list(csv.DictReader(handle))
    assert choice["chosen"] == cells["fire"]["setting"] and choice["best"].startswith("fire@")
    fixed = [c for name, c in cells.items() if name.startswith("fire@")]
    best = max(c["test_ra"] - max(0.0, none["test_acc"] - c["test_acc"]) for c in fixed)
    assert float(choice["best_pa_minus_drop"]) == pytest.approx(best)
    assert "| none |" not in estimation and f"| {len(split_record(record).clean_reference) + 5} |" in estimation

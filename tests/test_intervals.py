"""95% intervals: the within-cell bootstrap, DER's pairing, aggregation across cells, and the tables that show them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fire_bench import intervals
from fire_bench.evaluation import evaluate, protocol_split, with_der
from fire_bench.grid import DefenseSpec, Protocol, load_grid
from fire_bench.intervals import (
    across_cells,
    cell_intervals,
    half_width,
    mean_over_rows,
    pack_outcomes,
    t_quantile,
    unpack_outcomes,
)
from fire_bench.report import K_CURVE_COLUMNS, _columns, _summary, cell_text, leaderboard, markdown_table, write_csv
from fire_defense import FireDefenseError

from helpers import write_fake_record

PARTS = ("clean_correct", "clean_rejected", "poisoned_target", "poisoned_label", "poisoned_rejected")


def exactly(n: int, hits: int, seed: int) -> np.ndarray:
    """``n`` booleans of which exactly ``hits`` are true, in a seeded order."""
    flags = np.zeros(n, dtype=bool)
    flags[:hits] = True
    return np.random.default_rng(seed).permutation(flags)


def make_row(
    flags: dict[str, np.ndarray],
    defense: str = "d",
    seed: int = 0,
    record: str = "r",
    clean_ids: np.ndarray | None = None,
    poisoned_ids: np.ndarray | None = None,
    detector: bool = False,
) -> dict:
    """A cell row as ``evaluate`` makes it (metrics the means of its packed outcomes), from boolean vectors."""
    n_clean, n_poisoned = len(flags["clean_correct"]), len(flags["poisoned_target"])
    full = {
        "clean_rejected": np.zeros(n_clean, bool),
        "poisoned_rejected": np.zeros(n_poisoned, bool),
        "poisoned_label": ~flags["poisoned_target"],
        **flags,
    }
    clean_ids = np.arange(n_clean) if clean_ids is None else clean_ids
    poisoned_ids = np.arange(1000, 1000 + n_poisoned) if poisoned_ids is None else poisoned_ids
    row = {
        "record": record, "dataset": "ds", "backbone": "bb", "attack_name": "a", "ratio": 0.1, "seed": seed,
        "defense_name": defense, "defense": defense, "table": "leaderboard", "split": f"split {seed}",
        "test_acc": float(full["clean_correct"].mean()), "test_asr": float(full["poisoned_target"].mean()),
        "test_ra": float(full["poisoned_label"].mean()),
        "outcomes": pack_outcomes(full, clean_ids, poisoned_ids),
    }  # fmt: skip
    if detector:
        row["tpr"], row["fpr"] = float(full["poisoned_rejected"].mean()), float(full["clean_rejected"].mean())
    return row


# --- within a cell ------------------------------------------------------------------------------------------------


def test_packing_round_trips_and_damage_is_one_line():
    rng = np.random.default_rng(0)
    flags = {name: rng.random(37 if name.startswith("clean") else 23) < 0.5 for name in PARTS}
    row = make_row(flags, detector=True)
    unpacked = unpack_outcomes(row)
    assert set(unpacked) == set(PARTS)
    for name in PARTS:
        np.testing.assert_array_equal(unpacked[name], flags[name])
    assert unpack_outcomes({"test_acc": 0.5}) is None and cell_intervals({"test_acc": 0.5}) == {}
    lying = {**row, "test_acc": row["test_acc"] + 0.01}
    with pytest.raises(FireDefenseError, match="do not give its test_acc"):
        unpack_outcomes(lying)
    damaged = {**row, "outcomes": {**row["outcomes"], "clean": {**row["outcomes"]["clean"], "correct": "!!"}}}
    with pytest.raises(FireDefenseError, match="damaged"):
        cell_intervals(damaged)
    with pytest.raises(FireDefenseError, match="3 outcomes for 4 samples"):
        pack_outcomes({name: np.zeros(3, bool) for name in PARTS}, np.arange(4), np.arange(3))


def test_a_known_distribution_gets_the_textbook_interval():
    n = 500  # 450 of 500 correct: Wilson's half-width is near the normal one, 1.96 * sqrt(0.9 * 0.1 / 500)
    row = make_row({"clean_correct": exactly(n, 450, 1), "poisoned_target": exactly(n, 100, 2)})
    ci = cell_intervals(row)
    expected = 1.96 * math.sqrt(0.9 * 0.1 / n)
    assert ci["test_acc_ci_low"] < 0.9 < ci["test_acc_ci_high"]
    assert (ci["test_acc_ci_high"] - ci["test_acc_ci_low"]) / 2 == pytest.approx(expected, abs=0.003)
    assert (ci["test_asr_ci_high"] - ci["test_asr_ci_low"]) / 2 == pytest.approx(1.96 * math.sqrt(0.16 / n), abs=0.003)
    assert set(ci) == {f"{m}_ci_{s}" for m in ("test_acc", "test_asr", "test_ra") for s in ("low", "high")}


def test_a_rate_of_zero_or_one_keeps_a_width():
    n = 500  # no poisoned input sent to the target: the upper bound is near the rule of three's 3 / n
    row = make_row({"clean_correct": np.ones(n, bool), "poisoned_target": np.zeros(n, bool)})
    ci = cell_intervals(row)
    assert ci["test_asr_ci_low"] == pytest.approx(0, abs=1e-12) and 0.005 < ci["test_asr_ci_high"] < 3 / n + 0.002
    assert ci["test_acc_ci_high"] == pytest.approx(1) and 1 - 3 / n - 0.002 < ci["test_acc_ci_low"] < 0.995


def test_the_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    covered = []
    for trial in range(120):  # each trial its own samples, so its own resamples
        row = make_row(
            {"clean_correct": rng.random(300) < 0.9, "poisoned_target": rng.random(200) < 0.3},
            clean_ids=np.arange(300) + 1000 * trial,
        )
        ci = cell_intervals(row)
        covered.append(ci["test_acc_ci_low"] <= 0.9 <= ci["test_acc_ci_high"])
    assert 0.88 <= np.mean(covered) <= 0.995  # 95% +- 2 sd of 120 trials


def test_intervals_are_deterministic_and_seeded_by_the_samples():
    rng = np.random.default_rng(3)
    flags = {"clean_correct": rng.random(200) < 0.8, "poisoned_target": rng.random(200) < 0.5}
    first = cell_intervals(make_row(flags))
    intervals._counts.cache_clear()  # recomputed from the seed, not read back from the cache
    assert cell_intervals(make_row(flags)) == first
    a, b = intervals._counts("00000000000000aa", 50), intervals._counts("00000000000000ab", 50)
    assert a.shape == (intervals.RESAMPLES, 50) and (a.sum(axis=1) == 50).all() and not np.array_equal(a, b)


def test_detectors_get_tpr_and_fpr_intervals():
    n = 400
    flags = {
        "clean_correct": exactly(n, 360, 4),
        "clean_rejected": exactly(n, 20, 5),
        "poisoned_target": exactly(n, 40, 6),
        "poisoned_rejected": exactly(n, 300, 7),
    }
    ci = cell_intervals(make_row(flags, detector=True))
    assert ci["tpr_ci_low"] < 0.75 < ci["tpr_ci_high"] and ci["fpr_ci_low"] < 0.05 < ci["fpr_ci_high"]
    assert ci["tpr_ci_high"] - ci["tpr_ci_low"] > ci["fpr_ci_high"] - ci["fpr_ci_low"]  # p(1-p) larger at 0.75


# --- DER is paired --------------------------------------------------------------------------------------------


def test_der_resamples_the_same_positions_of_the_undefended_row():
    rng = np.random.default_rng(11)
    base_flags = {"clean_correct": rng.random(300) < 0.9, "poisoned_target": rng.random(300) < 0.95}
    base = make_row(base_flags, defense="none")
    # a defense identical to the undefended model: DER is 0.5 in every resample only if the positions are shared
    same = cell_intervals(make_row(base_flags, defense="copy"), base)
    assert same["der_ci_low"] == same["der_ci_high"] == 0.5
    # a defense that removes the backdoor on a third of the inputs and costs 1% clean accuracy
    fixed = base_flags["poisoned_target"] & (rng.random(300) < 0.66)
    hurt = base_flags["clean_correct"].copy()
    hurt[np.flatnonzero(hurt)[:3]] = False
    row = make_row({"clean_correct": hurt, "poisoned_target": fixed}, defense="d")
    der = with_der([base, row])[1]
    assert der["der_ci_low"] < der["der"] < der["der_ci_high"]
    assert der["der"] == pytest.approx((base["test_asr"] - row["test_asr"] - 0.01 + 1) / 2)
    assert "der_ci_low" not in cell_intervals(row)  # no undefended row, no DER interval


def test_der_refuses_rows_scored_on_other_samples_or_in_another_order():
    flags = {"clean_correct": exactly(100, 90, 0), "poisoned_target": exactly(100, 95, 1)}
    base = make_row(flags, defense="none")
    for other in (
        {"clean_ids": np.arange(100) + 1},
        {"poisoned_ids": np.arange(1000, 1100)[::-1]},
    ):
        with pytest.raises(FireDefenseError, match=r"scored different (clean|poisoned) samples"):
            cell_intervals(make_row(flags, **other), base)


# --- across cells ---------------------------------------------------------------------------------------------------


def test_one_cell_keeps_its_bootstrap_and_several_get_a_t_interval():
    assert across_cells([0.9], [0.87], [0.92]) == (0.9, 0.87, 0.92)
    # the seeds disagree more than their noise: mean +- t(2) s / sqrt(3)
    mean, low, high = across_cells([0.80, 0.90, 0.85], [0.79, 0.89, 0.84], [0.81, 0.91, 0.86])
    h = 4.303 * 0.05 / math.sqrt(3)
    assert mean == pytest.approx(0.85) and (low, high) == (pytest.approx(0.85 - h), pytest.approx(0.85 + h))
    # they agree by chance: the interval is never narrower than their noise, sqrt(sum h_i^2) / m
    mean, low, high = across_cells([0.5, 0.5], [0.45, 0.46], [0.55, 0.54])
    assert high - mean == pytest.approx(math.sqrt(0.05**2 + 0.04**2) / 2) and low == pytest.approx(2 * mean - high)
    assert across_cells([0.99, 1.0], [0.97, 0.99], [1.0, 1.0])[2] == 1.0  # clipped to a fraction
    assert across_cells([0.5, 0.6], [0.4, None], [0.6, 0.7]) == (pytest.approx(0.55), None, None)
    with pytest.raises(FireDefenseError, match="one each"):
        across_cells([0.5, 0.6], [0.4], [0.6])


def test_t_quantiles_integrate_to_95_percent():
    for df in (1, 2, 5, 30, 31, 60, 200):
        t = t_quantile(df)
        x = np.linspace(-t, t, 400_001)
        density = (1 + x**2 / df) ** (-(df + 1) / 2)
        density *= math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        assert float(np.sum((density[1:] + density[:-1]) / 2) * (x[1] - x[0])) == pytest.approx(0.95, abs=2e-4)
    with pytest.raises(FireDefenseError, match="degree of freedom"):
        t_quantile(0)


def test_the_leaderboard_aggregates_one_and_several_seeds():
    rng = np.random.default_rng(5)
    rows = []
    for seed in (0, 1, 2):
        none = {"clean_correct": rng.random(200) < 0.9, "poisoned_target": rng.random(200) < 0.97}
        fire = {
            "clean_correct": none["clean_correct"],
            "poisoned_target": none["poisoned_target"] & (rng.random(200) < 0.1),
        }
        ids = np.arange(200) + 500 * seed
        rows += [make_row(none, "none", seed, clean_ids=ids), make_row(fire, "fire", seed, clean_ids=ids)]
    cells = {(r["defense_name"], r["seed"]): r for r in with_der(rows)}
    one = {r["defense_name"]: r for r in leaderboard([r for r in rows if r["seed"] == 0])}
    for metric in ("test_acc", "test_asr", "test_ra", "der"):
        assert one["fire"][f"{metric}_ci_low"] == cells["fire", 0][f"{metric}_ci_low"]
        assert one["fire"][f"{metric}_ci_high"] == cells["fire", 0][f"{metric}_ci_high"]
    three = {r["defense_name"]: r for r in leaderboard(rows)}
    for metric in ("test_acc", "test_asr", "der"):
        members = [cells["fire", s] for s in (0, 1, 2)]
        expected = across_cells(*([m[f"{metric}{s}"] for m in members] for s in ("", "_ci_low", "_ci_high")))
        got = three["fire"]
        assert (got[metric], got[f"{metric}_ci_low"], got[f"{metric}_ci_high"]) == pytest.approx(expected)
    assert three["fire"]["seeds"] == 3 and "outcomes" not in three["fire"]


# --- tables -------------------------------------------------------------------------------------------------------


def test_tables_show_value_plus_minus_half_width_and_the_csv_the_bounds(tmp_path):
    assert cell_text(0.918, "test_acc", {"test_acc_ci_low": 0.906, "test_acc_ci_high": 0.93}) == "91.80 ± 1.20"
    assert cell_text(0.02, "test_asr", {"test_asr_ci_low": 0.01, "test_asr_ci_high": 0.036}) == "2.00 ± 1.60"
    assert cell_text(0.918, "test_acc") == "91.80" and half_width(0.5, 0.4, 0.55) == pytest.approx(0.1)
    assert cell_text(0.003, "ratio") == "0.003" and cell_text(0.1, "ratio") == "0.1"  # a ratio keeps its digits
    rng = np.random.default_rng(2)
    none = {"clean_correct": rng.random(100) < 0.9, "poisoned_target": rng.random(100) < 0.9}
    fire = {"clean_correct": none["clean_correct"], "poisoned_target": rng.random(100) < 0.1}
    board = leaderboard([make_row(none, "none"), make_row(fire, "fire", detector=True)])
    columns = _columns(board)
    bounds = [f"{m}_ci_{s}" for m in ("test_acc", "test_asr", "test_ra", "der", "tpr", "fpr") for s in ("low", "high")]
    assert columns[:8] == [
        "dataset",
        "backbone",
        "attack_name",
        "defense_name",
        "ratio",
        *("test_acc", "test_asr", "test_ra"),
    ]
    assert columns[-len(bounds) :] == bounds and "outcomes" not in columns
    write_csv(board, [*columns, "split"], tmp_path / "board.csv")
    header, *lines = (tmp_path / "board.csv").read_text().splitlines()
    assert header.split(",")[: len(columns)] == columns and len(lines) == 2
    fire_csv = dict(zip(header.split(","), lines[1].split(","), strict=False))
    assert (
        0
        <= float(fire_csv["test_asr_ci_low"])
        <= float(fire_csv["test_asr"])
        <= float(fire_csv["test_asr_ci_high"])
        <= 1
    )
    table = markdown_table(board, columns)
    assert "_ci_" not in table and table.count(" ± ") >= 2 * 4 + 2  # four rates each row; tpr, fpr for fire
    summary = _summary(board, load_grid("quick"), 60.0)
    assert "± half-width of a 95% interval" in summary and " ± " in summary.splitlines()[2]
    assert {"test_acc_ci_low", "der_ci_high"} <= set(K_CURVE_COLUMNS)


def test_the_mean_over_attacks_adds_half_widths_in_quadrature():
    mean, width = mean_over_rows([0.9, 0.8], [0.87, 0.76], [0.93, 0.83])
    assert mean == pytest.approx(0.85) and width == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)
    assert mean_over_rows([0.9, 0.8], [0.87, None], [0.93, 0.83])[1] is None


# --- evaluate carries what the bootstrap needs -------------------------------------------------------------------


def test_evaluate_rows_carry_outcomes_that_give_their_metrics(tmp_path):
    from fire_adapters import load_record

    record = load_record(write_fake_record(tmp_path, name="badnet_i", n_train=300, n_test=150, seed=0))
    protocol = Protocol(clean_size=120, k=5, defender_share=0.2, eval_clean=40, eval_poisoned=30)
    split = protocol_split(record, protocol, seed=0)
    rows = [evaluate(record, split, DefenseSpec(name), protocol, "cpu").row for name in ("none", "bitdepth")]
    packed = rows[0]["outcomes"]
    assert (packed["clean"]["n"], packed["poisoned"]["n"]) == (40, 30) and json.loads(json.dumps(packed)) == packed
    assert rows[0]["outcomes"]["clean"]["samples"] == rows[1]["outcomes"]["clean"]["samples"]  # the same samples
    for row in rows:
        vectors = unpack_outcomes(row)
        assert vectors is not None and vectors["clean_correct"].mean() == row["test_acc"]
        assert vectors["poisoned_target"].mean() == row["test_asr"] and len(vectors["poisoned_label"]) == 30
    base, defended = with_der(rows)
    assert base["der_ci_low"] == base["der_ci_high"] == 0.5
    assert defended["test_acc_ci_low"] <= defended["test_acc"] <= defended["test_acc_ci_high"]

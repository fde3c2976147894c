"""The benchmark's outputs: the leaderboard (Markdown, CSV, a sortable HTML page), the k-curve, plots, a summary.

Rows aggregate the cells of one dataset, backbone, attack (the record's label: ``badnet-all2all`` is not
``badnet``), ratio and defense over the protocol seeds and the record seeds (records that differ only in
their seed, as a grid's ``make`` block trains them): the mean, the standard deviation in ``*_std``
columns, ``seeds`` (the cells) and ``records`` (the records among them), and a 95% interval in
``<metric>_ci_low`` / ``<metric>_ci_high`` for the rates and DER (:mod:`fire_bench.intervals`: a cell's
Wilson or bootstrap interval, or the t-interval across several cells; the Markdown shows
``value ± half-width``). BackdoorBench's columns come first (``dataset,
backbone, attack_name, defense_name, ratio, test_acc, test_asr, test_ra``), then ours: DER
against the undefended model on the same record and seed, detection figures (TPR, FPR, AUROC) where a defense rejects or
scores, forward passes per sample, then the latency phase's measurements of that defense on the
same dataset and backbone (latency per sample at each batch size and its ratio to the undefended
model, peak memory, fitting time). The summary says whether the latency can be trusted: the
undefended model timed against itself must read 1.00 +- :data:`LATENCY_TOLERANCE`.

``pivot.md`` is the leaderboard as a defense x attack table per dataset and backbone; ``choices.md`` lists
where each defense that chooses a layer or setting on defender data (FIRE) acted, per record and seed.
The Markdown/CSV writers here are the only ones (``fire_bench.fire_report`` uses them too); the HTML page
is ``fire_bench.page``, the plots ``fire_bench.plots``.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fire_bench.evaluation import METRICS, with_der
from fire_bench.grid import Grid
from fire_bench.intervals import INTERVAL_METRICS, across_cells, half_width, mean_over_rows

if TYPE_CHECKING:
    from fire_bench.runner import GridResults

__all__ = [
    "LATENCY_TOLERANCE",
    "cell_text",
    "choices",
    "latency_check",
    "leaderboard",
    "markdown_table",
    "pivot_markdown",
    "write_csv",
    "write_outputs",
]

KEYS = ("dataset", "backbone", "attack_name", "defense_name", "ratio")
PERCENT = (*METRICS, "der", "tpr", "fpr", "auroc")
COSTS = ("peak_mem_mb", "fit_s")  # besides the latency_* columns, what the latency phase adds to a row
CI_SUFFIXES = ("_ci_low", "_ci_high")
K_CURVE_COLUMNS = (
    "attack_name", "record", "seed", "k", "layers", *METRICS, "der",
    *(f"{m}{s}" for m in (*METRICS, "der") for s in CI_SUFFIXES),
)  # fmt: skip
CHOICE_COLUMNS = ("dataset", "backbone", "attack_name", "record", "seed", "defense_name", "layers", "setting")
LATENCY_TOLERANCE = 0.05


def _timed(timings: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The latency phase's measurements by dataset, backbone and defense label, with only the columns rows get."""
    return {
        (t["dataset"], t["backbone"], t["defense_name"]): {
            k: v for k, v in t.items() if k.startswith("latency_") or k in COSTS
        }
        for t in timings
    }


def leaderboard(rows: Sequence[dict[str, Any]], timings: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """One row per dataset, backbone, attack, ratio and defense of the leaderboard's cells (pooling record seeds
    and protocol seeds): means, ``*_std`` spreads, 95% intervals (:func:`fire_bench.intervals.across_cells`), in
    the grid's order, with the latency phase's measurements of the same dataset, backbone and defense."""
    return _board(with_der(rows), timings)


def _board(scored: Sequence[dict[str, Any]], timings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`leaderboard` of rows that already carry DER and its interval (:func:`with_der`)."""
    timed = _timed(timings)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in scored:
        if row["table"] == "leaderboard":
            groups[tuple(row[k] for k in KEYS)].append(row)
    numeric = ["test_acc", "test_asr", "test_ra", "der", "tpr", "fpr", "auroc", "forward_passes"]
    board = []
    for keys, members in groups.items():
        entry: dict[str, Any] = dict(zip(KEYS, keys, strict=True))
        for column in numeric:
            scored = [r for r in members if r.get(column) is not None]
            values = [r[column] for r in scored]
            entry[column] = float(np.mean(values)) if values else None
            if column in ("test_acc", "test_asr", "test_ra", "der") and len(values) > 1:
                entry[f"{column}_std"] = float(np.std(values))
            if column in INTERVAL_METRICS and values:
                lows, highs = ([r.get(f"{column}{s}") for r in scored] for s in CI_SUFFIXES)
                _, low, high = across_cells(values, lows, highs)
                if low is not None:
                    entry[f"{column}_ci_low"], entry[f"{column}_ci_high"] = low, high
        entry.update(timed.get((entry["dataset"], entry["backbone"], entry["defense_name"]), {}))
        entry["seeds"], entry["records"] = len(members), len({r["record"] for r in members})
        entry["split"] = members[0]["split"]
        board.append(entry)
    return board


def pivot_markdown(board: Sequence[dict[str, Any]]) -> str:
    """The leaderboard as a reader scans it: one table per dataset and backbone, a row per defense, a column per
    attack, each cell ``clean accuracy / ASR / PA`` (%, the row's means), and the mean over the attacks."""
    parts = []
    for dataset, backbone in dict.fromkeys((r["dataset"], r["backbone"]) for r in board):
        rows = [r for r in board if (r["dataset"], r["backbone"]) == (dataset, backbone)]
        attacks = list(dict.fromkeys(r["attack_name"] for r in rows))
        cells = {(r["defense_name"], r["attack_name"]): r for r in rows}
        table = []
        for defense in dict.fromkeys(r["defense_name"] for r in rows):
            found = [cells[defense, a] for a in attacks if (defense, a) in cells]
            mean = {m: float(np.mean([r[m] for r in found])) for m in METRICS}
            shown = {attack: _triple(cells.get((defense, attack))) for attack in attacks}
            table.append({"defense": defense, **shown, "mean": _triple(mean)})
        parts.append(f"## {dataset}, {backbone}\n\n" + markdown_table(table, ["defense", *attacks, "mean"]))
    return "\n".join(parts)


def _triple(row: dict[str, Any] | None) -> str:
    """``clean / ASR / PA`` of a row in percent, one decimal; empty where the defense has no row."""
    return "" if row is None else " / ".join(f"{100 * row[m]:.1f}" for m in METRICS)


def choices(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leaderboard cells of defenses that chose a layer or a setting on defender data (``layers`` /
    ``setting`` not empty), in the grid's order: where FIRE acted on each record, and the like."""
    return [r for r in rows if r["table"] == "leaderboard" and (r.get("layers") or r.get("setting"))]


def latency_check(timings: Sequence[dict[str, Any]], tolerance: float = LATENCY_TOLERANCE) -> str:
    """One line: whether the undefended model, timed against itself, reads 1.00 +- ``tolerance`` at every batch
    size of every dataset and backbone (if not, the machine was busy and the latency ratios are noise)."""
    readings = [
        (t["dataset"], t["backbone"], key.removeprefix("latency_").removesuffix("_ratio"), value)
        for t in timings
        if t["defense_name"] == "none"
        for key, value in t.items()
        if key.startswith("latency_") and key.endswith("_ratio")
    ]
    if not readings:
        return "latency check: not measured (no latency phase, or no 'none' defense timed)."
    shown = ", ".join(f"{value:.3f} at {size} ({dataset}, {backbone})" for dataset, backbone, size, value in readings)
    if all(abs(value - 1) <= tolerance for *_, value in readings):
        return f"latency check: ok, the undefended model against itself reads {shown} (1.00 +- {tolerance:.2f})."
    return (
        f"latency check: FAILED, the undefended model against itself reads {shown}, not 1.00 +- {tolerance:.2f}: "
        "the latency columns are noise. Rerun on an idle machine (or with more latency rounds) after deleting "
        "cache/latency-*.json."
    )


def cell_text(value: Any, column: str, row: dict[str, Any] | None = None) -> str:
    """``value`` of ``column`` as shown in a table: rates in percent, with ``± half-width`` of the 95% interval when
    ``row`` has its bounds (the larger side of the interval, so the shown range covers it)."""
    if value is None or value == "":
        return ""
    if column.removesuffix("_std") in PERCENT:
        low, high = (row.get(f"{column}{s}") for s in CI_SUFFIXES) if row else (None, None)
        if low is None or high is None:
            return f"{100 * value:.2f}"
        return f"{100 * value:.2f} ± {100 * half_width(value, low, high):.2f}"
    if isinstance(value, float):
        three = "latency" in column or column in COSTS or column.endswith("_s") or column == "ratio"
        return f"{value:.3g}" if three else f"{value:.2f}"  # a poisoning ratio of 0.003 is not 0.00
    return str(value)


def _columns(board: Sequence[dict[str, Any]]) -> list[str]:
    """BackdoorBench's columns, then ours, spreads, then interval bounds last; ``split`` (long) is left to the CSV."""
    columns = list(dict.fromkeys(k for row in board for k in row if k != "split"))
    bounds = [f"{m}{s}" for m in INTERVAL_METRICS for s in CI_SUFFIXES if f"{m}{s}" in columns]
    rest = [c for c in columns if c not in bounds]
    return [c for c in rest if not c.endswith("_std")] + [c for c in rest if c.endswith("_std")] + bounds


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """``rows`` as CSV with ``columns`` (others left out), raw values."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a Markdown table of ``columns``: accuracies, rates and DER in percent (marked ``(%)``), each with
    ``± half-width`` of its 95% interval where the row has one (:func:`cell_text`); interval bounds among
    ``columns`` are not columns of their own there."""
    columns = [c for c in columns if not c.endswith(CI_SUFFIXES)]
    header = [c + (" (%)" if c.removesuffix("_std") in PERCENT else "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell_text(row.get(c), c, row) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(grid: Grid, results: GridResults, out: Path, seconds: float) -> list[dict[str, Any]]:
    """Write the leaderboard (md, csv, html), the k-curve (md, csv, png), the plots, ``cells.json``,
    ``timings.json`` and ``summary.txt``; print the summary."""
    from fire_bench.page import leaderboard_page
    from fire_bench.plots import leaderboard_plots, plot_k_curve

    out.mkdir(parents=True, exist_ok=True)
    scored = with_der(results.rows)  # DER and every interval, once for the leaderboard and the k-curve
    board = _board(scored, results.timings)
    check = latency_check(results.timings)
    every = _columns(board)
    columns = [c for c in every if not c.endswith(("_std", *CI_SUFFIXES)) or c == "test_ra_std"]
    split = board[0]["split"] if board else ""
    notes = [f"Grid {grid.name!r}; protocol: {split}.", check, f"Wall time {seconds / 60:.1f} min."]
    (out / "leaderboard.md").write_text(
        f"# Leaderboard: {grid.name}\n\n" + "\n\n".join(notes) + "\n\n" + markdown_table(board, columns)
    )
    write_csv(board, [*every, "split"], out / "leaderboard.csv")
    plots = leaderboard_plots(board, out)
    curve = [r for r in scored if r["table"] == "k_curve"]
    if curve:
        write_csv(curve, K_CURVE_COLUMNS, out / "k_curve.csv")
        (out / "k_curve.md").write_text(markdown_table(curve, K_CURVE_COLUMNS))
        plots.append(plot_k_curve(curve, out / "k_curve.png"))
    (out / "pivot.md").write_text(
        f"# Defenses x attacks: {grid.name}\n\nClean accuracy / ASR / PA (%), each the mean over the row's cells "
        "(record seeds x protocol seeds); `leaderboard.md` has every figure with its 95% interval.\n\n"
        + pivot_markdown(board)
    )
    (out / "choices.md").write_text(
        f"# What each defense chose: {grid.name}\n\nThe layers (and settings) each defense that chooses them "
        "picked on its defender data, per record and protocol seed.\n\n"
        + markdown_table(choices(scored), CHOICE_COLUMNS)
    )
    (out / "cells.json").write_text(json.dumps(list(results.rows), indent=1))
    (out / "timings.json").write_text(json.dumps(list(results.timings), indent=1))
    # the page: every column (intervals folded into their metric), the protocol in its own sentence, the PNGs inline
    page = leaderboard_page(
        board,
        every,
        f"fire-defense leaderboard: {grid.name}",
        notes[1:],
        {p.name: p.read_bytes() for p in plots},
    )
    (out / "leaderboard.html").write_text(page)
    summary = _summary(board, grid, seconds) + check + "\n"
    (out / "summary.txt").write_text(summary)
    print(summary)
    return board


def _summary(board: Sequence[dict[str, Any]], grid: Grid, seconds: float) -> str:
    """Each defense's mean over the board's rows (attacks, each already a mean over seeds); a rate's ``±`` is
    :func:`fire_bench.intervals.mean_over_rows` of the rows' 95% intervals (the attacks are a fixed set, their
    errors independent)."""
    lines = [
        f"{grid.name}: {len(board)} rows in {seconds / 60:.1f} min. Mean over attacks (and seeds), "
        "± half-width of a 95% interval:"
    ]
    defenses = list(dict.fromkeys(r["defense_name"] for r in board))
    width = max([len("defense"), *map(len, defenses)])
    lines.append(
        f"{'defense':{width}s} {'clean acc':>15s} {'ASR':>15s} {'PA':>15s} {'DER':>15s} {'passes':>6s} "
        f"{'x latency b1':>12s}"
    )
    for defense in defenses:
        rows = [r for r in board if r["defense_name"] == defense]
        shown = []
        for column in ("test_acc", "test_asr", "test_ra", "der"):
            scored = [r for r in rows if r.get(column) is not None]
            if not scored:
                shown.append(f"{'-':>15s}")
                continue
            lows, highs = ([r.get(f"{column}{s}") for r in scored] for s in CI_SUFFIXES)
            mean, half = mean_over_rows([r[column] for r in scored], lows, highs)
            text = f"{100 * mean:.2f}%" if half is None else f"{100 * mean:.2f} ± {100 * half:.2f}%"
            shown.append(f"{text:>15s}")
        passes = [r["forward_passes"] for r in rows if r.get("forward_passes") is not None]
        latency = [r["latency_b1_ratio"] for r in rows if r.get("latency_b1_ratio") is not None]
        passes_text = f"{np.mean(passes):6.2f}" if passes else f"{'-':>6s}"
        latency_text = f"{np.mean(latency):11.2f}x" if latency else f"{'not timed':>12s}"
        lines.append(f"{defense:{width}s} {' '.join(shown)} {passes_text} {latency_text}")
    return "\n".join(lines) + "\n"

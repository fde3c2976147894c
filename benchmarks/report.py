"""The benchmark's outputs: the leaderboard (Markdown, CSV, a sortable HTML page), the k-curve, plots, a summary.

Rows aggregate a record's cells over the protocol seeds (mean, and the standard deviation in
``*_std`` columns). BackdoorBench's columns come first (``dataset, backbone, attack_name,
defense_name, ratio, test_acc, test_asr, test_ra``), then ours: DER against the undefended model
on the same record and seed, detection figures (TPR, FPR, AUROC) where a defense rejects or
scores, forward passes per sample, then the latency phase's measurements of that defense on the
same dataset and backbone (latency per sample at each batch size and its ratio to the undefended
model, peak memory, fitting time). The summary says whether the latency can be trusted: the
undefended model timed against itself must read 1.00 +- :data:`LATENCY_TOLERANCE`.

The Markdown/CSV writers and the k-curve plot here are the only ones; ``fire_bench.fire_report``
uses them too.
"""

from __future__ import annotations

import csv
import html
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fire_bench.evaluation import METRICS, with_der
from fire_bench.grid import Grid

if TYPE_CHECKING:
    from fire_bench.runner import GridResults

__all__ = [
    "LATENCY_TOLERANCE",
    "latency_check",
    "leaderboard",
    "markdown_table",
    "plot_k_curve",
    "write_csv",
    "write_outputs",
]

KEYS = ("dataset", "backbone", "attack_name", "defense_name", "ratio")
PERCENT = (*METRICS, "der", "tpr", "fpr", "auroc")
COSTS = ("peak_mem_mb", "fit_s")  # besides the latency_* columns, what the latency phase adds to a row
K_CURVE_COLUMNS = ("attack_name", "record", "seed", "k", "layers", *METRICS, "der")
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
    """One row per record and defense of the leaderboard's cells: means over seeds, ``*_std`` spreads, in the
    grid's order, with the latency phase's measurements of the same dataset, backbone and defense."""
    timed = _timed(timings)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in with_der(rows):
        if row["table"] == "leaderboard":
            groups[(row["record"], *(row[k] for k in KEYS))].append(row)
    numeric = ["test_acc", "test_asr", "test_ra", "der", "tpr", "fpr", "auroc", "forward_passes"]
    board = []
    for (_, *keys), members in groups.items():
        entry: dict[str, Any] = dict(zip(KEYS, keys, strict=True))
        for column in numeric:
            values = [r[column] for r in members if r.get(column) is not None]
            entry[column] = float(np.mean(values)) if values else None
            if column in ("test_acc", "test_asr", "test_ra", "der") and len(values) > 1:
                entry[f"{column}_std"] = float(np.std(values))
        entry.update(timed.get((entry["dataset"], entry["backbone"], entry["defense_name"]), {}))
        entry["seeds"] = len(members)
        entry["split"] = members[0]["split"]
        board.append(entry)
    return board


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


def _cell(value: Any, column: str) -> str:
    if value is None or value == "":
        return ""
    if column.removesuffix("_std") in PERCENT:
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.3g}" if "latency" in column or column in COSTS or column.endswith("_s") else f"{value:.2f}"
    return str(value)


def _columns(board: Sequence[dict[str, Any]]) -> list[str]:
    """BackdoorBench's columns, then ours, spreads last; ``split`` (long) is left to the CSV."""
    columns = list(dict.fromkeys(k for row in board for k in row if k != "split"))
    return [c for c in columns if not c.endswith("_std")] + [c for c in columns if c.endswith("_std")]


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: Path) -> None:
    """``rows`` as CSV with ``columns`` (others left out), raw values."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a Markdown table of ``columns``: accuracies, rates and DER in percent (marked ``(%)``)."""
    header = [c + (" (%)" if c.removesuffix("_std") in PERCENT else "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_SORTER = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
  const asc = th.dataset.order !== 'asc'; th.dataset.order = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => body.appendChild(r));
}));
"""


def _html(board: Sequence[dict[str, Any]], columns: Sequence[str], title: str, notes: Sequence[str]) -> str:
    head = "".join(f"<th title='click to sort'>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c), c))}</td>" for c in columns) + "</tr>" for row in board
    )
    paragraphs = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; cursor: pointer; position: sticky; top: 0; }}
td:nth-child(-n+4), th:nth-child(-n+4) {{ text-align: left; }}
tr:nth-child(even) {{ background: #fafafa; }}
img {{ max-width: 48%; margin: 1em 1% 0 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>{paragraphs}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>Percentages; *_std: standard deviation over seeds; click a column to sort.</p>
<img src="asr_vs_latency.png" alt="ASR against latency overhead">
<img src="per_attack.png" alt="per-attack bars">
<img src="k_curve.png" alt="poisoned accuracy against k">
<script>{_SORTER}</script>
</body></html>
"""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_k_curve(curve: Sequence[dict[str, Any]], path: Path) -> None:
    """Poisoned accuracy against ``k`` from the k-curve's rows, one line per attack (mean over seeds, their spread
    as error bars)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for attack in dict.fromkeys(r["attack_name"] for r in curve):
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in curve:
            if r["attack_name"] == attack:
                by_k[r["k"]].append(100 * r["test_ra"])
        ks = sorted(by_k)
        spread = [np.std(by_k[k]) for k in ks] if any(len(v) > 1 for v in by_k.values()) else None
        axis.errorbar(ks, [np.mean(by_k[k]) for k in ks], yerr=spread, marker="o", label=attack)
    modes = ", ".join(dict.fromkeys(str(r["params"].get("mode", "")) for r in curve))
    axis.set(
        xscale="log",
        xlabel="poisoned inputs seen (k)",
        ylabel="poisoned accuracy (%)",
        title=f"FIRE streaming ({modes}): accuracy on poisoned inputs vs k",
    )
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plots(board: Sequence[dict[str, Any]], out: Path) -> None:
    plt = _pyplot()
    defenses = list(dict.fromkeys(r["defense_name"] for r in board))
    attacks = list(dict.fromkeys(r["attack_name"] for r in board))
    colours = {d: plt.cm.tab20(i % 20) for i, d in enumerate(defenses)}

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for defense in defenses:
        rows = [r for r in board if r["defense_name"] == defense and r.get("latency_b1_ratio")]
        if rows:
            x = np.mean([r["latency_b1_ratio"] for r in rows])
            y = 100 * np.mean([r["test_asr"] for r in rows])
            axis.scatter(x, y, color=colours[defense], s=50)
            axis.annotate(defense, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set(
        xscale="log",
        xlabel="latency per sample, batch 1 (x undefended, log)",
        ylabel="attack success rate (%), mean over attacks",
        title="ASR against latency overhead",
    )
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    figure.savefig(out / "asr_vs_latency.png", dpi=120)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / max(1, len(defenses))
    for axis, metric, label in zip(axes, ("test_asr", "test_ra"), ("ASR (%)", "poisoned accuracy (%)"), strict=True):
        for i, defense in enumerate(defenses):
            values = [
                100 * next((r[metric] for r in board if r["attack_name"] == a and r["defense_name"] == defense), 0)
                for a in attacks
            ]
            axis.bar(np.arange(len(attacks)) + i * width, values, width, color=colours[defense], label=defense)
        axis.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
        axis.set(ylabel=label, title=f"{label} per attack")
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "per_attack.png", dpi=120)
    plt.close(figure)


def write_outputs(grid: Grid, results: GridResults, out: Path, seconds: float) -> list[dict[str, Any]]:
    """Write the leaderboard (md, csv, html), the k-curve (md, csv, png), the plots, ``cells.json``,
    ``timings.json`` and ``summary.txt``; print the summary."""
    out.mkdir(parents=True, exist_ok=True)
    board = leaderboard(results.rows, results.timings)
    check = latency_check(results.timings)
    columns = [c for c in _columns(board) if not c.endswith("_std") or c == "test_ra_std"]
    split = board[0]["split"] if board else ""
    notes = [f"Grid {grid.name!r}; protocol: {split}.", check, f"Wall time {seconds / 60:.1f} min."]
    (out / "leaderboard.md").write_text(
        f"# Leaderboard: {grid.name}\n\n" + "\n\n".join(notes) + "\n\n" + markdown_table(board, columns)
    )
    write_csv(board, [*_columns(board), "split"], out / "leaderboard.csv")
    (out / "leaderboard.html").write_text(_html(board, columns, f"fire-defense leaderboard: {grid.name}", notes))
    curve = [r for r in with_der(results.rows) if r["table"] == "k_curve"]
    if curve:
        write_csv(curve, K_CURVE_COLUMNS, out / "k_curve.csv")
        (out / "k_curve.md").write_text(markdown_table(curve, K_CURVE_COLUMNS))
        plot_k_curve(curve, out / "k_curve.png")
    (out / "cells.json").write_text(json.dumps(list(results.rows), indent=1))
    (out / "timings.json").write_text(json.dumps(list(results.timings), indent=1))
    _plots(board, out)
    summary = _summary(board, grid, seconds) + check + "\n"
    (out / "summary.txt").write_text(summary)
    print(summary)
    return board


def _summary(board: Sequence[dict[str, Any]], grid: Grid, seconds: float) -> str:
    lines = [f"{grid.name}: {len(board)} rows in {seconds / 60:.1f} min. Mean over attacks (and seeds):"]
    lines.append(
        f"{'defense':14s} {'clean acc':>9s} {'ASR':>7s} {'PA':>7s} {'DER':>6s} {'passes':>6s} {'x latency b1':>12s}"
    )
    for defense in dict.fromkeys(r["defense_name"] for r in board):
        rows = [r for r in board if r["defense_name"] == defense]
        m = {
            column: float(np.mean([r[column] for r in rows if r.get(column) is not None] or [np.nan]))
            for column in ("test_acc", "test_asr", "test_ra", "der", "forward_passes", "latency_b1_ratio")
        }
        lines.append(
            f"{defense:14s} {100 * m['test_acc']:8.2f}% {100 * m['test_asr']:6.2f}% {100 * m['test_ra']:6.2f}% "
            f"{100 * m['der']:5.1f}% {m['forward_passes']:6.0f} {m['latency_b1_ratio']:11.2f}x"
        )
    return "\n".join(lines) + "\n"

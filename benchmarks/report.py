"""The benchmark's outputs: the leaderboard (Markdown, CSV, a sortable HTML page), plots, and a summary.

Rows aggregate a record's cells over the protocol seeds (mean, and the standard deviation in
``*_std`` columns). BackdoorBench's columns come first (``dataset, backbone, attack_name,
defense_name, ratio, test_acc, test_asr, test_ra``), then ours: DER against the undefended model
on the same record and seed, detection figures (TPR, FPR, AUROC) where a defense rejects or
scores, forward passes per sample, latency per sample at each batch size and its ratio to the
undefended model measured in the same cell, peak memory.
"""

from __future__ import annotations

import csv
import html
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fire_bench.grid import Grid
from fire_defense.metrics import defense_effectiveness_rating

__all__ = ["leaderboard", "write_outputs"]

KEYS = ("dataset", "backbone", "attack_name", "defense_name", "ratio")
PERCENT = ("test_acc", "test_asr", "test_ra", "der", "tpr", "fpr", "auroc")


def _with_der(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each defense cell with its DER against the undefended model on the same record and seed."""
    undefended = {(c["record"], c["seed"]): c for c in cells if c.get("defense") == "none"}
    rows = []
    for cell in cells:
        if "curve" in cell:
            continue
        base = undefended.get((cell["record"], cell["seed"]))
        der = (
            defense_effectiveness_rating(base["test_asr"], cell["test_asr"], base["test_acc"], cell["test_acc"])
            if base
            else None
        )
        rows.append({**cell, "der": der})
    return rows


def leaderboard(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record and defense: means over seeds, ``*_std`` spreads, in the grid's order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in _with_der(cells):
        groups[(row["record"], *(row[k] for k in KEYS))].append(row)
    numeric = [
        "test_acc",
        "test_asr",
        "test_ra",
        "der",
        "tpr",
        "fpr",
        "auroc",
        "forward_passes",
        *sorted({k for rows in groups.values() for k in rows[0] if k.startswith("latency_")}),
        "peak_mem_mb",
        "fit_s",
    ]
    board = []
    for (_, *keys), rows in groups.items():
        entry: dict[str, Any] = dict(zip(KEYS, keys, strict=True))
        for column in numeric:
            values = [r[column] for r in rows if r.get(column) is not None]
            entry[column] = float(np.mean(values)) if values else None
            if column in ("test_acc", "test_asr", "test_ra", "der") and len(values) > 1:
                entry[f"{column}_std"] = float(np.std(values))
        entry["seeds"] = len(rows)
        entry["split"] = rows[0]["split"]
        board.append(entry)
    return board


def _cell(value: Any, column: str) -> str:
    if value is None or value == "":
        return ""
    if column.removesuffix("_std") in PERCENT:
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.3g}" if "latency" in column or column == "peak_mem_mb" else f"{value:.2f}"
    return str(value)


def _columns(board: Sequence[dict[str, Any]]) -> list[str]:
    """BackdoorBench's columns, then ours, spreads last; ``split`` (long) is left to the CSV."""
    columns = list(dict.fromkeys(k for row in board for k in row if k != "split"))
    return [c for c in columns if not c.endswith("_std")] + [c for c in columns if c.endswith("_std")]


def _write_csv(board: Sequence[dict[str, Any]], path: Path) -> None:
    columns = [*_columns(board), "split"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(board)


def _markdown(board: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    header = [c + (" (%)" if c.removesuffix("_std") in PERCENT else "") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), c) for c in columns) + " |" for row in board]
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


def _plots(board: Sequence[dict[str, Any]], curves: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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

    if curves:
        figure, axis = plt.subplots(figsize=(6, 4))
        for attack in dict.fromkeys(c["attack_name"] for c in curves):
            runs = [c["curve"] for c in curves if c["attack_name"] == attack]
            ks = [p["k"] for p in runs[0]]
            ra = 100 * np.array([[p["test_ra"] for p in run] for run in runs])
            axis.errorbar(ks, ra.mean(0), yerr=ra.std(0) if len(runs) > 1 else None, marker="o", label=attack)
        axis.set(
            xscale="log", xlabel="poisoned inputs seen (k)", ylabel="poisoned accuracy (%)", title="FIRE streaming"
        )
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / "k_curve.png", dpi=120)
        plt.close(figure)


def write_outputs(grid: Grid, cells: Sequence[dict[str, Any]], out: Path, seconds: float) -> list[dict[str, Any]]:
    """Write the leaderboard (md, csv, html), ``k_curve.csv``, the plots and ``summary.txt``; print the summary."""
    out.mkdir(parents=True, exist_ok=True)
    board = leaderboard(cells)
    curves = [c for c in cells if "curve" in c]
    columns = [c for c in _columns(board) if not c.endswith("_std") or c == "test_ra_std"]
    split = board[0]["split"] if board else ""
    notes = [f"Grid {grid.name!r}; protocol: {split}.", f"Wall time {seconds / 60:.1f} min."]
    (out / "leaderboard.md").write_text(
        f"# Leaderboard: {grid.name}\n\n" + "\n\n".join(notes) + "\n\n" + _markdown(board, columns)
    )
    _write_csv(board, out / "leaderboard.csv")
    (out / "leaderboard.html").write_text(_html(board, columns, f"fire-defense leaderboard: {grid.name}", notes))
    with open(out / "k_curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["attack_name", "record", "seed", "k", "layer", "test_acc", "test_asr", "test_ra"])
        for c in curves:
            for p in c["curve"]:
                writer.writerow(
                    [
                        c["attack_name"],
                        c["record"],
                        c["seed"],
                        p["k"],
                        p["layer"],
                        *(p[m] for m in ("test_acc", "test_asr", "test_ra")),
                    ]
                )
    (out / "cells.json").write_text(json.dumps(list(cells), indent=1))
    _plots(board, curves, out)
    summary = _summary(board, grid, seconds)
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

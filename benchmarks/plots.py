"""The benchmark's plots (PNG): ASR against latency, per-attack bars, poisoned accuracy against k.

Each ``*_figure`` function builds a matplotlib figure (tick labels on every axis, a legend where colours
name things); :func:`leaderboard_plots` and :func:`plot_k_curve` write them as PNG files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

__all__ = [
    "asr_latency_figure",
    "k_curve_figure",
    "leaderboard_plots",
    "per_attack_figure",
    "place_labels",
    "plot_k_curve",
]

_MARKERS = "osD^vP*Xph<>"
# offsets (points) tried in turn for a point's label: beside, above, below, then further out
_OFFSETS = [(6, 3), (6, -11), (-6, 3), (-6, -11), (0, 8), (0, -16), (14, 12), (14, -20), (-14, 12), (-14, -20)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styles(defenses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour (tab20's dark shades first, then its light ones) and marker for each defense."""
    plt = _pyplot()
    order = [2 * i for i in range(10)] + [2 * i + 1 for i in range(10)]
    return {
        d: {"color": plt.cm.tab20(order[i % 20]), "marker": _MARKERS[i % len(_MARKERS)]} for i, d in enumerate(defenses)
    }


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)
    return path


def place_labels(axis: Axes, points: Sequence[tuple[float, float, str]], fontsize: float = 8) -> list[Text]:
    """Label each ``(x, y, text)`` point where its label overlaps no other label or marker and stays inside the
    axes, trying :data:`_OFFSETS` in turn; a point with no free place stays unlabelled (the legend names it).
    Call once the figure's layout is final: placement is measured in pixels."""
    figure = axis.figure
    renderer = figure.canvas.get_renderer()
    frame = axis.get_window_extent(renderer)
    centres = [axis.transData.transform((x, y)) for x, y, _ in points]
    markers = [(cx - 5, cy - 5, cx + 5, cy + 5) for cx, cy in centres]
    taken: list[tuple[float, float, float, float]] = []
    placed = []

    def free(box: tuple[float, float, float, float], own: int) -> bool:
        x0, y0, x1, y1 = box
        if x0 < frame.x0 or x1 > frame.x1 or y0 < frame.y0 or y1 > frame.y1:
            return False
        others = taken + [m for j, m in enumerate(markers) if j != own]
        return all(x1 <= a0 or x0 >= a1 or y1 <= b0 or y0 >= b1 for a0, b0, a1, b1 in others)

    for i, (x, y, text) in enumerate(points):
        for dx, dy in _OFFSETS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            far = abs(dx) > 8 or abs(dy) > 12  # a label away from its marker gets a leader line
            label = axis.annotate(
                text,
                (x, y),
                textcoords="offset points",
                xytext=(dx, dy),
                fontsize=fontsize,
                ha=ha,
                va="bottom",
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkA": 0, "shrinkB": 4} if far else None,
            )
            extent = label.get_window_extent(renderer)
            box = (extent.x0 - 1, extent.y0 - 1, extent.x1 + 1, extent.y1 + 1)
            if free(box, i):
                taken.append(box)
                placed.append(label)
                break
            label.remove()
    return placed


def asr_latency_figure(board: Sequence[dict[str, Any]]) -> Figure:
    """Mean ASR over attacks against the mean latency ratio at batch 1, one marker per defense, a legend, and
    the labels that fit without overlapping."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    defenses = list(dict.fromkeys(r["defense_name"] for r in board))
    styles = _styles(defenses)
    figure, axis = plt.subplots(figsize=(7.5, 4.6))
    points = []
    for defense in defenses:
        rows = [r for r in board if r["defense_name"] == defense and r.get("latency_b1_ratio")]
        if rows:
            x = float(np.mean([r["latency_b1_ratio"] for r in rows]))
            y = 100 * float(np.mean([r["test_asr"] for r in rows]))
            axis.scatter(x, y, s=45, label=defense, edgecolors="black", linewidths=0.4, **styles[defense])
            points.append((x, y, defense))
    axis.set(
        xscale="log",
        xlabel="latency per input at batch 1 (x the undefended model, log scale)",
        ylabel="attack success rate (%), mean over attacks",
        title="ASR against latency overhead",
    )
    axis.set_ylim(-4, 108)
    if points:
        xs = [p[0] for p in points]
        axis.set_xlim(min(xs) / 1.25, max(xs) * 1.6)
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3, which="both")
    if points:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    figure.tight_layout()
    place_labels(axis, points)
    return figure


def _mean_percent(board: Sequence[dict[str, Any]], attack: str, defense: str, metric: str) -> float:
    """``metric`` of ``defense`` on ``attack`` in percent, the mean over its rows; NaN (no bar) where it has none."""
    found = [
        r[metric]
        for r in board
        if r["attack_name"] == attack and r["defense_name"] == defense and r.get(metric) is not None
    ]
    return 100 * float(np.mean(found)) if found else float("nan")


def per_attack_figure(board: Sequence[dict[str, Any]]) -> Figure:
    """ASR and poisoned accuracy per attack, one bar per defense (a gap where a defense has no row), with y
    tick labels on both panels and one legend below."""
    plt = _pyplot()
    defenses = list(dict.fromkeys(r["defense_name"] for r in board))
    attacks = list(dict.fromkeys(r["attack_name"] for r in board))
    styles = _styles(defenses)
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    width = 0.8 / max(1, len(defenses))
    for axis, metric, label in zip(axes, ("test_asr", "test_ra"), ("ASR (%)", "poisoned accuracy (%)"), strict=True):
        for i, defense in enumerate(defenses):
            values = [_mean_percent(board, a, defense, metric) for a in attacks]
            axis.bar(np.arange(len(attacks)) + i * width, values, width, color=styles[defense]["color"], label=defense)
        axis.set_xticks(np.arange(len(attacks)) + 0.4 - width / 2, attacks)
        axis.set(ylabel=label, title=f"{label} per attack", ylim=(0, 104))
        axis.tick_params(labelleft=True)
        axis.grid(alpha=0.3, axis="y")
    handles, labels = axes[0].get_legend_handles_labels()
    columns = min(len(labels), 8) or 1
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    rows = -(-len(labels) // columns)
    figure.tight_layout(rect=(0, 0.045 * rows + 0.01, 1, 1))
    return figure


def k_curve_figure(curve: Sequence[dict[str, Any]]) -> Figure:
    """Poisoned accuracy against ``k``: one line per attack (per dataset, backbone and mode too where the curve
    has several), the mean over seeds with their spread as error bars; ticks at the measured ``k``."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    plt = _pyplot()
    fields = [
        f
        for f in ("dataset", "backbone", "mode")
        if len({str(r["params"].get("mode", "")) if f == "mode" else r.get(f) for r in curve}) > 1
    ]

    def line(r: dict[str, Any]) -> str:
        extra = [str(r["params"].get("mode", "")) if f == "mode" else str(r[f]) for f in fields]
        return r["attack_name"] + (f" ({', '.join(extra)})" if extra else "")

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(line(r) for r in curve):
        by_k: dict[int, list[float]] = defaultdict(list)
        for r in curve:
            if line(r) == name:
                by_k[r["k"]].append(100 * r["test_ra"])
        ks = sorted(by_k)
        spread = [np.std(by_k[k]) for k in ks] if any(len(v) > 1 for v in by_k.values()) else None
        axis.errorbar(ks, [np.mean(by_k[k]) for k in ks], yerr=spread, marker="o", capsize=3, label=name)
    modes = ", ".join(dict.fromkeys(str(r["params"].get("mode", "")) for r in curve))
    axis.set(
        xscale="log",
        xlabel="poisoned inputs seen (k, log scale)",
        ylabel="poisoned accuracy (%)",
        title=f"FIRE streaming ({modes}): accuracy on poisoned inputs vs k",
        ylim=(0, 100),
    )
    axis.xaxis.set_major_locator(FixedLocator(sorted({r["k"] for r in curve})))
    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_k_curve(curve: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write :func:`k_curve_figure` of the k-curve's rows to ``path`` (PNG); returns ``path``."""
    return _save(k_curve_figure(curve), path)


def leaderboard_plots(board: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``asr_vs_latency.png`` and ``per_attack.png`` of the leaderboard's rows into ``out``; returns their
    paths."""
    return [
        _save(asr_latency_figure(board), out / "asr_vs_latency.png"),
        _save(per_attack_figure(board), out / "per_attack.png"),
    ]

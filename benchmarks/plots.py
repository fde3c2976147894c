"""The benchmark's plots (PNG): ASR against latency, per-attack bars, poisoned accuracy against k."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["leaderboard_plots", "plot_k_curve"]


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


def leaderboard_plots(board: Sequence[dict[str, Any]], out: Path) -> None:
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

"""Latency as ratios to the undefended model, measured interleaved in one run.

Each benchmark times its variant with pytest-benchmark (absolute numbers, in its own table) and,
separately (``fire_bench.timing.interleaved_ratio``), alternates rounds of the variant and of the
undefended model on the same input and keeps the median of the per-round ratios, so drifts of a
shared, noisy machine cancel out.
Ratios are written to ``$FIRE_RESULTS`` (default ``results/``) as ``latency.md`` and ``latency.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

RATIOS: dict[str, dict[str, dict[str, float]]] = {}


@pytest.fixture
def record_ratio(benchmark):
    """Store a variant's interleaved ratio (and its pytest-benchmark median) under a group."""

    def record(group: str, name: str, ratio: float) -> None:
        benchmark.extra_info["ratio_to_undefended"] = ratio
        RATIOS.setdefault(group, {})[name] = {"median_s": benchmark.stats.stats.median, "ratio": ratio}

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not RATIOS:
        return
    lines = ["| group | variant | median (ms) | ratio to undefended (interleaved) |", "|---|---|---|---|"]
    for group, variants in RATIOS.items():
        for name, entry in variants.items():
            lines.append(f"| {group} | {name} | {1000 * entry['median_s']:.3f} | {entry['ratio']:.3f} |")
    out = Path(os.environ.get("FIRE_RESULTS", "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    (out / "latency.json").write_text(json.dumps(RATIOS, indent=2) + "\n")
    terminalreporter.write_line("\n".join(["", "Latency relative to the undefended model (same run):", *lines]))
    terminalreporter.write_line(f"written to {out / 'latency.md'}")

"""Timing and memory measurements that survive a shared, noisy machine.

Latency is reported as a ratio to the undefended model measured in the same run, alternating the
two so that drifts cancel; memory as the peak growth while a call runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

__all__ = ["interleaved_ratio", "peak_memory_mb"]


def interleaved_ratio(
    variant: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int,
    repeat: int,
    timings: dict[str, list[float]] | None = None,
) -> float:
    """Median over ``rounds`` of time(variant) / time(baseline), each timed over ``repeat`` calls, alternating.

    Args:
        timings: If given, filled with the raw seconds per round under ``'variant'`` and ``'baseline'``.
    """
    ratios = []
    for i in range(rounds):
        times = {}
        order = (("variant", variant), ("baseline", baseline))
        for name, fn in order if i % 2 else order[::-1]:
            started = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name] = time.perf_counter() - started
            if timings is not None:
                timings.setdefault(name, []).append(times[name])
        ratios.append(times["variant"] / times["baseline"])
    return float(np.median(ratios))


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory growth (MiB) while ``fn`` runs: CUDA's allocator on a GPU; on the CPU, the process's peak
    resident set (Linux: reset through ``/proc/self/clear_refs``); ``None`` where neither can be read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) / 1024

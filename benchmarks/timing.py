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

__all__ = ["interleaved_ratio", "peak_memory_mb", "synchronized"]


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that returns only once the device has finished its work (a GPU runs asynchronously: timing
    the call alone would time the kernel launches)."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return call


def interleaved_ratio(
    variant: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int,
    repeat: int,
    timings: dict[str, list[float]] | None = None,
    min_rounds: int | None = None,
    precision: float = 0.0,
) -> float:
    """Median over ``rounds`` of time(variant) / time(baseline), each timed over ``repeat`` calls, alternating.

    Args:
        timings: If given, filled with the raw seconds per round under ``'variant'`` and ``'baseline'``.
        min_rounds: With ``precision``, the rounds after which the timing may stop early (default: all).
        precision: Stop once the median's standard error (estimated from the median absolute deviation of
            the per-round ratios) is below ``precision`` times the median: a quiet machine needs few rounds.
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
        if min_rounds is not None and len(ratios) >= min_rounds:
            median = float(np.median(ratios))
            spread = 1.4826 * float(np.median(np.abs(np.asarray(ratios) - median)))  # a robust sigma
            if 1.2533 * spread / np.sqrt(len(ratios)) < precision * median:
                break
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

"""Where cells run: one interface, local worker processes by default, Ray for a cluster.

An executor maps :func:`fire_bench.cells.run_cell` over cells and yields ``(cell, result)`` as they
finish. Every executor reads and writes the same cache folder (a shared file system on a
cluster), so the results, and what a rerun skips, are the same whichever ran them.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Protocol

from fire_bench.cells import Cell, KCurveCell, run_cell
from fire_defense import FireDefenseError, Registry

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "create_executor"]

AnyCell = Cell | KCurveCell


class Executor(Protocol):
    def run(self, cells: Sequence[AnyCell], cache_dir: Path) -> Iterator[tuple[AnyCell, dict[str, Any]]]:
        """Run every cell (``run_cell``), yielding each with its result as it finishes."""
        ...


def _run_in_worker(cell: AnyCell, cache_dir: str, threads: int) -> dict[str, Any]:
    import torch

    os.environ["TQDM_DISABLE"] = "1"  # one progress bar, the runner's: none from inside a worker
    torch.set_num_threads(threads)
    return run_cell(cell, cache_dir)


class LocalExecutor:
    """``workers`` processes on this machine (spawned: safe with CUDA and OpenMP), sharing its cores."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise FireDefenseError(f"workers must be >= 1, got {workers}.")
        self.workers = workers

    def run(self, cells: Sequence[AnyCell], cache_dir: Path) -> Iterator[tuple[AnyCell, dict[str, Any]]]:
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=context) as pool:
            futures = {pool.submit(_run_in_worker, cell, str(cache_dir), threads): cell for cell in cells}
            for future in as_completed(futures):
                yield futures[future], future.result()


class RayExecutor:
    """Cells as Ray tasks on a cluster (``address``: its head, e.g. ``'ray://head:10001'`` or
    ``'head:6379'``), or on a local Ray instance when ``address`` is ``None``.

    Each task asks for ``cpus_per_cell`` CPUs (and a GPU with ``gpus_per_cell``); Ray schedules them.
    """

    def __init__(self, address: str | None = None, cpus_per_cell: int = 1, gpus_per_cell: float = 0) -> None:
        self.address = address
        self.cpus_per_cell = cpus_per_cell
        self.gpus_per_cell = gpus_per_cell

    def run(self, cells: Sequence[AnyCell], cache_dir: Path) -> Iterator[tuple[AnyCell, dict[str, Any]]]:
        try:
            import ray
        except ImportError:
            raise FireDefenseError("the Ray executor needs Ray: pip install 'fire-defense[ray]'.") from None
        started_here = not ray.is_initialized()
        if started_here:
            local = self.address is None
            ray.init(
                address=self.address,
                include_dashboard=False,
                log_to_driver=False,
                **({"num_cpus": os.cpu_count(), "_node_ip_address": "127.0.0.1"} if local else {}),
            )
        try:
            task = ray.remote(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell)(_run_in_worker)
            pending = {task.remote(cell, str(Path(cache_dir).resolve()), self.cpus_per_cell): cell for cell in cells}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield pending.pop(ref), ray.get(ref)
        finally:
            if started_here:
                ray.shutdown()


EXECUTORS: Registry[type] = Registry("executor")
EXECUTORS.add("local", LocalExecutor)
EXECUTORS.add("ray", RayExecutor)


def create_executor(name: str, **options: Any) -> Executor:
    """The executor called ``name`` (``'local'``, ``'ray'``) with its options (``None`` values dropped)."""
    return EXECUTORS.get(name)(**{k: v for k, v in options.items() if v is not None})

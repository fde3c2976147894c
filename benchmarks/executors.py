"""Where the benchmark's work runs: one interface, local worker processes by default, Ray for a cluster.

An executor maps a function over items (the grid's cells; the records it has to train) and yields
``(item, result)`` as each finishes. The function and the items must pickle: a module-level
function, or a :func:`functools.partial` of one. Cells read and write one cache folder (a shared
file system on a cluster), so the results, and what a rerun skips, are the same whichever executor
ran them.

Ctrl-C is the runner's to handle: local workers ignore SIGINT, and an interrupted (or closed)
:meth:`LocalExecutor.map` cancels what has not started and terminates its workers at once (a cell
is cached only when whole, so nothing finished is lost).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol, TypeVar

from fire_defense import FireDefenseError, Registry
from fire_defense.progress import ENV_VAR as PROGRESS_ENV_VAR

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "create_executor"]

Item = TypeVar("Item")


class Executor(Protocol):
    def map(self, fn: Callable[[Item], Any], items: Sequence[Item]) -> Iterator[tuple[Item, Any]]:
        """``fn(item)`` for every item, yielding each item with its result as it finishes."""
        ...


def _call_in_worker(fn: Callable[[Item], Any], item: Item, threads: int) -> Any:
    import torch

    os.environ[PROGRESS_ENV_VAR] = "0"  # one progress bar, the runner's: none from inside a worker
    torch.set_num_threads(threads)
    return fn(item)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit when ``parent``, the process that started the pool, is gone (killed, not
    shut down), instead of computing on, orphaned, for nobody. (It is passed in: the parent may have
    died while this worker was still starting.) Ctrl-C (SIGINT, sent to the whole process group by a
    terminal) is ignored here: the parent stops the workers. tqdm's lock is a thread lock here (no bar
    crosses processes): its default, a multiprocessing lock, would be reported leaked by a terminated
    worker."""
    from tqdm import tqdm

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tqdm.set_lock(threading.RLock())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class LocalExecutor:
    """``workers`` processes on this machine (spawned: safe with CUDA and OpenMP), sharing its cores.

    Each worker gets ``cpu_count // workers`` threads: on small models, one single-threaded process
    per core outruns one process using every core (PyTorch's intra-op threads cost more than they
    gain on small convolutions). The default is one worker per core.
    """

    def __init__(self, workers: int | None = None) -> None:
        workers = (os.cpu_count() or 1) if workers is None else workers
        if workers < 1:
            raise FireDefenseError(f"workers must be >= 1, got {workers}.")
        self.workers = workers

    def map(self, fn: Callable[[Item], Any], items: Sequence[Item]) -> Iterator[tuple[Item, Any]]:
        if not items:
            return
        workers = min(self.workers, len(items))
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),))
        processes = pool._processes  # the live dict of workers (shutdown forgets it); no public handle before 3.14
        try:
            futures = {pool.submit(_call_in_worker, fn, item, threads): item for item in items}
            for future in as_completed(futures):
                yield futures[future], future.result()
        except (KeyboardInterrupt, GeneratorExit):  # Ctrl-C, or the caller stopped: stop the running ones too
            _terminate(pool, processes)
            raise
        except BaseException:  # a failed cell: start nothing new, let the running ones finish (and be cached)
            pool.shutdown(wait=False, cancel_futures=True)
            try:
                pool.shutdown(wait=True)
            except KeyboardInterrupt:  # ... unless Ctrl-C says not to wait
                _terminate(pool, processes)
                raise
            raise
        pool.shutdown(wait=True)


def _terminate(pool: ProcessPoolExecutor, processes: dict[int, Any]) -> None:
    """Cancel what has not started, end the worker ``processes`` now, and shut ``pool`` down."""
    pool.shutdown(wait=False, cancel_futures=True)
    alive = [process for process in list(processes.values()) if process.is_alive()]
    for process in alive:
        process.terminate()
    for process in alive:
        process.join(5)
    pool.shutdown(wait=True)  # the pool's own thread sees its workers gone and ends


class RayExecutor:
    """Tasks on a Ray cluster (``address``: its head, e.g. ``'ray://head:10001'`` or ``'head:6379'``),
    or on a local Ray instance when ``address`` is ``None``.

    Each task asks for ``cpus_per_task`` CPUs (and a GPU with ``gpus_per_task``); Ray schedules them.
    """

    def __init__(self, address: str | None = None, cpus_per_task: int = 1, gpus_per_task: float = 0) -> None:
        self.address = address
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task

    def map(self, fn: Callable[[Item], Any], items: Sequence[Item]) -> Iterator[tuple[Item, Any]]:
        if not items:
            return
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
            task = ray.remote(num_cpus=self.cpus_per_task, num_gpus=self.gpus_per_task)(_call_in_worker)
            pending = {task.remote(fn, item, self.cpus_per_task): item for item in items}
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

"""Run a grid: build or find its records, run every cell through an executor, time the defenses, write the outputs.

``fire-bench run --grid default`` is ``make bench``'s job; ``fire-bench fire-report`` runs the
``fire`` grid the same way. Two phases, both cached in ``<out>/cache/`` (only what is missing
runs, so an interrupted run resumes where it stopped):

1. the cells (:class:`fire_bench.cells.Cell`: every defense on every record under every seed, and
   the k-curve's points), in parallel through the executor; no cell times anything;
2. the latency cells (:class:`fire_bench.cells.LatencyCell`), one at a time in this process, with
   no worker left running: latency depends on the model and the defense, not on the attack, so
   each defense is timed once per dataset x backbone, on its first record, under the first seed.

Before any of it, every folder the run writes to (``out``, its cache, the records it makes) is made
and test-written, so a run never fails after its work. Ctrl-C stops a run within seconds (the
workers are terminated), keeps every finished cell, and raises :class:`RunInterrupted`, whose one
line says how many cells are cached; the command line prints it and exits with status 130.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from fire_adapters import RECORD_FILE
from fire_bench.atomic import writable_folder
from fire_bench.cells import Cell, LatencyCell, cached_result, run_cell, run_latency
from fire_bench.executors import Executor, LocalExecutor
from fire_bench.grid import Grid
from fire_defense import FireDefenseError, resolve_device

__all__ = ["GridResults", "RunInterrupted", "find_records", "grid_cells", "latency_cells", "run_grid"]

_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed} elapsed, {remaining} left{postfix}]"


class GridResults(NamedTuple):
    """What a grid computed: one row per cell (in :func:`grid_cells`' order) and one per latency cell."""

    rows: list[dict[str, Any]]
    timings: list[dict[str, Any]]


@contextlib.contextmanager
def _closing(results: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """``results``, closed on the way out if it can be (an executor's generator stops its workers then)."""
    try:
        yield results
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message (one line) says what is cached and that a rerun resumes."""


def find_records(folder: str | Path) -> list[Path]:
    """The record folders (``*/attack_result.pt``) directly in ``folder``, sorted."""
    found = sorted(p.parent for p in Path(folder).glob(f"*/{RECORD_FILE}"))
    if not found:
        raise FireDefenseError(
            f"no records (*/{RECORD_FILE}) in {folder}; make some with `fire-adapters make-records` "
            "or point --records at BackdoorBench's record/ folder."
        )
    return found


def _made_records(grid: Grid, folder: Path, data_root: str | None, device: str, executor: Executor) -> list[Path]:
    """The grid's records in ``folder``: those made before from the same recipe are found, the others trained by
    ``executor``."""
    from fire_adapters.factory import make_records

    recipes = grid.recipes()
    try:
        return [made.path for made in make_records(recipes, folder, data_root, device, executor=executor)]
    except KeyboardInterrupt:
        made = sum((folder / recipe.name / RECORD_FILE).is_file() for recipe in recipes)
        raise RunInterrupted(
            f"interrupted: {made} of {len(recipes)} records made, no cell run yet; run again to resume"
        ) from None


def grid_cells(
    grid: Grid, record_dirs: Sequence[Path], data_root: str | None = None, device: str = "auto"
) -> list[Cell]:
    """Every cell of ``grid`` on ``record_dirs``: record x seed x defense, then record x seed x each ``k`` of the
    k-curve (the streaming defense, the protocol's ``k`` set to that point)."""
    cells = [
        Cell(str(path), defense, grid.protocol, seed, data_root, device)
        for path in record_dirs
        for seed in grid.seeds
        for defense in grid.defenses
    ]
    if grid.k_curve is not None:
        cells += [
            Cell(str(path), grid.k_curve.defense, replace(grid.protocol, k=k), seed, data_root, device, "k_curve")
            for path in record_dirs
            for seed in grid.seeds
            for k in grid.k_curve.ks
        ]
    return cells


def latency_cells(grid: Grid, cells: Sequence[Cell], rows: Sequence[dict[str, Any]]) -> list[LatencyCell]:
    """The leaderboard's defenses, each timed once per dataset x backbone (read from the cells' ``rows``): on the
    first record of each, under the grid's first seed. None without a ``latency`` section."""
    if grid.latency is None:
        return []
    first: dict[tuple[str, str], str] = {}
    for cell, row in zip(cells, rows, strict=True):
        first.setdefault((row["dataset"], row["backbone"]), cell.record_dir)
    timed = set(first.values())
    return [
        LatencyCell(cell, grid.latency)
        for cell in cells
        if cell.table == "leaderboard" and cell.seed == grid.seeds[0] and cell.record_dir in timed
    ]


def run_grid(
    grid: Grid,
    out: str | Path = "results",
    records: str | Path | None = None,
    records_root: str | Path = "records",
    data_root: str | None = None,
    executor: Executor | None = None,
    device: str = "auto",
) -> GridResults:
    """Run ``grid`` (module docstring) and write its outputs to ``out`` (see :mod:`fire_bench.report`).

    Args:
        records: A folder of existing records; overrides the grid's own ``records`` / ``make``.
        records_root: Where records the grid makes are kept (``<records_root>/<grid name>/``).
    """
    started = time.perf_counter()
    resolve_device(device)  # a device that is not there fails now, before any record is found or hashed
    executor = executor or LocalExecutor()
    folder = records or grid.records
    if data_root is not None and not Path(data_root).is_dir():
        raise FireDefenseError(f"the data folder {data_root} does not exist or is not a folder; fix --data.")
    record_dirs = find_records(folder) if folder else None
    # every output folder made and test-written before any work starts
    out = writable_folder(out, "the output folder (--out)")
    cache = writable_folder(out / "cache", "the cache folder")
    if record_dirs is None:
        made = writable_folder(Path(records_root) / grid.name, "the records folder (--records-root)")
        record_dirs = _made_records(grid, made, data_root, device, executor)
    cells = grid_cells(grid, record_dirs, data_root, device)
    results = {cell.key: found for cell in cells if (found := cached_result(cell, cache)) is not None}
    # record by record (a worker keeps its records loaded), the costliest cells of each first (the workers
    # finish together); the bar advances by each cell's estimated cost, so its time-left estimate holds
    # when cheap and costly cells alternate
    todo = sorted((cell for cell in cells if cell.key not in results), key=lambda cell: (cell.record_dir, -cell.cost))
    tqdm.write(f"{grid.name}: {len(cells)} cells, {len(results)} cached, {len(todo)} to run")
    try:
        with (
            tqdm(total=sum(cell.cost for cell in todo), desc="cells", bar_format=_BAR) as progress,
            _closing(executor.map(functools.partial(run_cell, cache_dir=cache), todo)) as finished,
        ):
            for done, (cell, result) in enumerate(finished, 1):
                results[cell.key] = result
                last = f"{Path(cell.record_dir).name} {cell.defense.label}"
                progress.set_postfix_str(f"{done}/{len(todo)} cells, last {last}", False)
                progress.update(cell.cost)
    except KeyboardInterrupt:  # closing the map above stopped its workers
        raise RunInterrupted(f"interrupted: {len(results)} of {len(cells)} cells cached; run again to resume") from None
    rows = [results[cell.key] for cell in cells]

    jobs = latency_cells(grid, cells, rows)
    timings = {job.key: found for job in jobs if (found := cached_result(job, cache)) is not None}
    todo_timing = [job for job in jobs if job.key not in timings]
    tqdm.write(f"latency: {len(jobs)} defenses to time, {len(timings)} cached; one at a time, nothing else running")
    try:
        for job in tqdm(todo_timing, desc="latency", unit="defense"):
            timings[job.key] = run_latency(job, cache)
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"interrupted: {len(cells) + len(timings)} of {len(cells) + len(jobs)} cells cached "
            f"({len(timings)} of {len(jobs)} latency cells); run again to resume"
        ) from None
    from fire_bench.report import write_outputs

    done = GridResults(rows, [timings[job.key] for job in jobs])
    write_outputs(grid, done, out, seconds=time.perf_counter() - started)
    return done

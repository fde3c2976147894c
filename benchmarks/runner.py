"""Run a grid: build or find its records, run every cell through an executor, write the leaderboard.

``fire-bench run --grid default`` is ``make bench``'s job. Finished cells are read from
``<out>/cache/``; only the missing ones run, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fire_adapters import RECORD_FILE
from fire_bench.cells import Cell, KCurveCell, cached_result, run_cell
from fire_bench.executors import Executor, LocalExecutor
from fire_bench.grid import Grid
from fire_defense import FireDefenseError

__all__ = ["find_records", "grid_cells", "run_grid"]


def find_records(folder: str | Path) -> list[Path]:
    """The record folders (``*/attack_result.pt``) directly in ``folder``, sorted."""
    found = sorted(p.parent for p in Path(folder).glob(f"*/{RECORD_FILE}"))
    if not found:
        raise FireDefenseError(
            f"no records (*/{RECORD_FILE}) in {folder}; make some with `fire-adapters make-records` "
            "or point --records at BackdoorBench's record/ folder."
        )
    return found


def _made_records(grid: Grid, records_root: Path, data_root: str | None, device: str, executor: Executor) -> list[Path]:
    """The grid's records: those made before from the same recipe are found, the others trained by ``executor``."""
    from fire_adapters.factory import RecordRecipe, make_records
    from fire_adapters.training import TrainConfig

    assert grid.make is not None
    recipes = [
        RecordRecipe(dataset, attack, grid.make.model, seed, train=TrainConfig(epochs=grid.make.epochs))
        for dataset in grid.make.datasets
        for attack in grid.make.attacks
        for seed in grid.make.seeds
    ]
    return [made.path for made in make_records(recipes, records_root / grid.name, data_root, device, executor=executor)]


def grid_cells(
    grid: Grid, record_dirs: Sequence[Path], data_root: str | None = None, device: str = "auto"
) -> list[Cell | KCurveCell]:
    """Every cell of ``grid`` on ``record_dirs``: record x seed x defense, then the k-curves."""
    cells: list[Cell | KCurveCell] = [
        Cell(str(path), defense, grid.protocol, seed, grid.latency, data_root, device)
        for path in record_dirs
        for seed in grid.seeds
        for defense in grid.defenses
    ]
    if grid.k_curve is not None:
        cells += [
            KCurveCell(str(path), grid.k_curve, grid.protocol, seed, data_root, device)
            for path in record_dirs
            for seed in grid.seeds
        ]
    return cells


def run_grid(
    grid: Grid,
    out: str | Path = "results",
    records: str | Path | None = None,
    records_root: str | Path = "records",
    data_root: str | None = None,
    executor: Executor | None = None,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Run ``grid`` and write its outputs to ``out`` (see :mod:`fire_bench.report`); returns the cell results.

    Args:
        records: A folder of existing records; overrides the grid's own ``records`` / ``make``.
        records_root: Where records the grid makes are kept (``<records_root>/<grid name>/``).
    """
    out = Path(out)
    cache = out / "cache"
    started = time.perf_counter()
    executor = executor or LocalExecutor()
    folder = records or grid.records
    if folder:
        record_dirs = find_records(folder)
    else:
        record_dirs = _made_records(grid, Path(records_root), data_root, device, executor)
    cells = grid_cells(grid, record_dirs, data_root, device)
    results = {cell.key: found for cell in cells if (found := cached_result(cell, cache)) is not None}
    # record by record (a worker keeps its records loaded), the costliest cells of each first (the workers
    # finish together); the bar advances by each cell's estimated cost, so its time-left estimate holds
    # when cheap and costly cells alternate
    todo = sorted((cell for cell in cells if cell.key not in results), key=lambda cell: (cell.record_dir, -cell.cost))
    tqdm.write(f"{grid.name}: {len(cells)} cells, {len(results)} cached, {len(todo)} to run")
    bar = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed} elapsed, {remaining} left{postfix}]"
    with tqdm(total=sum(cell.cost for cell in todo), desc="cells", bar_format=bar) as progress:
        for done, (cell, result) in enumerate(executor.map(functools.partial(run_cell, cache_dir=cache), todo), 1):
            results[cell.key] = result
            label = cell.defense.label if isinstance(cell, Cell) else "k-curve"
            progress.set_postfix_str(f"{done}/{len(todo)} cells, last {Path(cell.record_dir).name} {label}", False)
            progress.update(cell.cost)
    from fire_bench.report import write_outputs

    ordered = [results[cell.key] for cell in cells]
    write_outputs(grid, ordered, out, seconds=time.perf_counter() - started)
    return ordered

"""FIRE's own figures, a view of the ``fire`` grid (``grids/fire.yaml``): no computation of its own.

``fire-bench fire-report --records records/`` runs that grid like any other
(:func:`fire_bench.runner.run_grid`: the same cells, cache, latency phase and outputs as the
leaderboard; by default the protocol's whole evaluation part is scored, as the BackdoorBench plugin
does) and adds, in the same folder (default ``results/fire/``):

- ``mitigation.{md,csv}``: per record and seed, the undefended model and each FIRE mode from ``k``
  unpaired poisoned inputs: the layer chosen, the metrics, DER, each with its 95% interval
  over the evaluation samples (``± half-width`` in the Markdown, ``*_ci_low`` / ``*_ci_high`` in the CSV);
- ``choice.{md,csv}``: per record and seed, the setting FIRE v2 chose from defender data (``fire``)
  beside the best of the grid's fixed settings (``fire@...``) in hindsight, by poisoned accuracy
  minus the clean-accuracy drop (``pa - drop``), so the gap the choice leaves is visible;
- ``estimation.md``: the cost of estimation, each FIRE fit (automatic layer choice) against one
  forward pass of the inputs it was fitted on, timed in the latency phase;
- the grid's k-curve (``k_curve.{md,csv,png}``, written with the leaderboard).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fire_bench.evaluation import METRICS, with_der
from fire_bench.executors import Executor
from fire_bench.grid import load_grid
from fire_bench.report import markdown_table, write_csv
from fire_bench.runner import GridResults, run_grid

__all__ = [
    "CHOICE_COLUMNS",
    "ESTIMATION_COLUMNS",
    "MITIGATION_COLUMNS",
    "choice_table",
    "estimation_table",
    "fire_report",
    "mitigation_table",
]

MITIGATION_COLUMNS = (
    "attack_name", "record", "seed", "defense_name", "k", "setting", *METRICS, "der",
    *(f"{m}_ci_{s}" for m in (*METRICS, "der") for s in ("low", "high")),
)  # fmt: skip
CHOICE_COLUMNS = ("attack_name", "record", "seed", "chosen", "chosen_pa_minus_drop", "best", "best_pa_minus_drop")
ESTIMATION_COLUMNS = ("record", "defense_name", "fit_inputs", "fit_forward_s", "fit_s", "fit_ratio")


def mitigation_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid's leaderboard cells (the undefended model and FIRE's modes), each with its DER and intervals."""
    return [row for row in with_der(rows) if row["table"] == "leaderboard"]


def choice_table(rows: list[dict[str, Any]], chosen: str = "fire", fixed: str = "fire@") -> list[dict[str, Any]]:
    """Per record and seed: the ``chosen`` row's setting and score beside the best ``fixed`` row in hindsight.

    The score is poisoned accuracy minus the drop in clean accuracy from the undefended model (``none``).
    """
    table = []
    cells = [row for row in rows if row["table"] == "leaderboard"]  # DER is not needed: no bootstrap
    for key in dict.fromkeys((row["record"], row["seed"]) for row in cells):
        same = [row for row in cells if (row["record"], row["seed"]) == key]
        base = next((row for row in same if row["defense"] == "none"), None)
        mine = next((row for row in same if row["defense_name"] == chosen), None)
        others = [row for row in same if row["defense_name"].startswith(fixed)]
        if base is None or mine is None or not others:
            continue

        def score(row: dict[str, Any], base: dict[str, Any] = base) -> float:
            return row["test_ra"] - max(0.0, base["test_acc"] - row["test_acc"])

        best = max(others, key=score)
        table.append(
            {
                "attack_name": mine["attack_name"],
                "record": key[0],
                "seed": key[1],
                "chosen": mine["setting"],
                "chosen_pa_minus_drop": score(mine),
                "best": best["defense_name"],
                "best_pa_minus_drop": score(best),
            }
        )
    return table


def estimation_table(timings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each timed defense but the undefended model: its fitting time and its ratio to one forward pass of its inputs."""
    return [{**t, "fit_ratio": t["fit_s"] / t["fit_forward_s"]} for t in timings if t["defense"] != "none"]


def fire_report(
    records: str | Path,
    out: str | Path = "results/fire",
    grid: str | Path = "fire",
    k: int | None = None,
    seed: int | None = None,
    executor: Executor | None = None,
    device: str = "auto",
) -> GridResults:
    """Run ``grid`` (``k`` and ``seed``, if given, replace its protocol's ``k`` and its seeds) on the records in
    ``records`` and write FIRE's figures (module docstring) beside its outputs in ``out``."""
    chosen = load_grid(grid)
    if k is not None:
        chosen = replace(chosen, protocol=replace(chosen.protocol, k=k))
    if seed is not None:
        chosen = replace(chosen, seeds=(seed,))
    out = Path(out)
    results = run_grid(chosen, out, records=records, executor=executor, device=device)
    mitigation = mitigation_table(results.rows)
    write_csv(mitigation, MITIGATION_COLUMNS, out / "mitigation.csv")
    (out / "mitigation.md").write_text(markdown_table(mitigation, MITIGATION_COLUMNS))
    choice = choice_table(results.rows)
    write_csv(choice, CHOICE_COLUMNS, out / "choice.csv")
    (out / "choice.md").write_text(markdown_table(choice, CHOICE_COLUMNS))
    (out / "estimation.md").write_text(
        "FIRE's estimation, timed in the latency phase: seconds to fit (automatic layer choice) against one "
        "forward pass of the same inputs (the clean reference and the k poisoned inputs).\n\n"
        + markdown_table(estimation_table(results.timings), ESTIMATION_COLUMNS)
    )
    return results

"""``python -m fire_bench`` (or ``fire-bench``): the benchmark's commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fire_bench.backdoorbench.install import add_commands as add_backdoorbench_commands
from fire_defense.errors import run_cli


def _fire_report(args: argparse.Namespace) -> None:
    from fire_bench.executors import LocalExecutor
    from fire_bench.fire_report import fire_report

    out = Path(args.out)
    executor = LocalExecutor(args.workers)
    fire_report(args.records, out, args.grid, args.k, args.seed, executor=executor, device=args.device)
    print((out / "mitigation.md").read_text())
    print((out / "estimation.md").read_text())
    print(f"written to {out}: mitigation, choice, k_curve, estimation, and the grid's leaderboard files")


def _run(args: argparse.Namespace) -> None:
    from fire_bench.executors import create_executor
    from fire_bench.grid import load_grid
    from fire_bench.runner import run_grid

    grid = load_grid(args.grid)
    options = {"workers": args.workers} if args.executor == "local" else {"address": args.address}
    executor = create_executor(args.executor, **options)
    run_grid(grid, args.out, args.records, args.records_root, args.data, executor, args.device)
    print(f"written to {args.out}: leaderboard.md, leaderboard.csv, leaderboard.html, plots")


def _defenses(args: argparse.Namespace) -> None:
    from fire_bench.defenses import DEFENSES, create_defense

    for name in DEFENSES.names(args.pattern):
        defense = create_defense(name)
        kind = "detector" if defense.rejects else "mitigation"
        needs = ", ".join(sorted(defense.needs)) or "clean data"
        print(f"{name:12s} {kind:10s} passes {defense.forward_passes:>5g}  needs {needs:9s} {defense.source}")
        print(f"{'':12s} {defense!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fire-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("fire-report", help="FIRE's core figures on a folder of records")
    report.add_argument("--records", default="records", help="folder of records (default: records/)")
    report.add_argument("--out", default="results/fire", help="output folder (default: results/fire/)")
    report.add_argument("--grid", default="fire", help="the grid to run (default: the shipped fire grid)")
    report.add_argument("--k", type=int, help="poisoned inputs the defender has seen (default: the grid's, 10)")
    report.add_argument("--seed", type=int, help="the protocol seed (default: the grid's, 0)")
    report.add_argument("--workers", type=int, help="local worker processes (default: one per CPU core)")
    report.add_argument("--device", default="auto")
    report.set_defaults(run=_fire_report)
    run = commands.add_parser("run", help="run a benchmark grid and write the leaderboard (make bench)")
    run.add_argument("--grid", default="default", help="a shipped grid (default, quick) or a YAML file")
    run.add_argument("--out", default="results", help="output folder (default: results/)")
    run.add_argument(
        "--records", help="a folder of existing records, e.g. BackdoorBench's record/ (default: make them)"
    )
    run.add_argument("--records-root", default="records", help="where made records are kept (default: records/)")
    run.add_argument("--data", help="where the datasets are (searched first), e.g. BackdoorBench's data/")
    run.add_argument("--executor", choices=("local", "ray"), default="local")
    run.add_argument("--workers", type=int, help="local worker processes (default: one per CPU core)")
    run.add_argument("--address", help="the Ray cluster's head (default: a local Ray instance)")
    run.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    run.set_defaults(run=_run)
    listing = commands.add_parser("defenses", help="list the runtime defenses and their parameters")
    listing.add_argument("pattern", nargs="?", default="*")
    listing.set_defaults(run=_defenses)
    add_backdoorbench_commands(commands)
    args = parser.parse_args(argv)
    return run_cli("fire-bench", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fire_bench`` (or ``fire-bench``): the benchmark's commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fire_adapters import RECORD_FILE
from fire_defense import FireDefenseError
from fire_defense.errors import run_cli


def _records(folder: str) -> list[Path]:
    found = sorted(p.parent for p in Path(folder).glob(f"*/{RECORD_FILE}"))
    if not found:
        raise FireDefenseError(
            f"no records (*/{RECORD_FILE}) in {folder}; make some with `fire-adapters make-records`."
        )
    return found


def _fire_report(args: argparse.Namespace) -> None:
    from fire_bench.fire_report import write_report

    out = write_report(_records(args.records), Path(args.out), k=args.k, seed=args.seed, device=args.device)
    print((out / "mitigation.md").read_text())
    print((out / "estimation.md").read_text())
    print(f"written to {out}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fire-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("fire-report", help="FIRE's core figures on a folder of records")
    report.add_argument("--records", default="records", help="folder of records (default: records/)")
    report.add_argument("--out", default="results/fire", help="output folder (default: results/fire/)")
    report.add_argument("--k", type=int, default=10, help="poisoned inputs the defender has seen (default 10)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--device", default="auto")
    report.set_defaults(run=_fire_report)
    args = parser.parse_args(argv)
    return run_cli("fire-bench", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())

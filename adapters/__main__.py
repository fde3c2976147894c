"""``python -m fire_adapters`` (or ``fire-adapters``): look at datasets, models and records from the shell."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence

from fire_adapters.datasets import DATASETS, DatasetNotFoundError, find_dataset
from fire_adapters.models import list_models
from fire_adapters.records import load_record
from fire_defense import FireDefenseError


def _datasets(args: argparse.Namespace) -> None:
    for name in DATASETS:
        spec = DATASETS.get(name)
        try:
            where = str(find_dataset(spec, root=args.data)[0])
        except DatasetNotFoundError:
            where = "not found (" + spec.how_to_get + ")"
        size = "x".join(map(str, spec.img_size))
        print(f"{name:13s} {spec.num_classes:4d} classes  {size:9s} {where}")


def _models(args: argparse.Namespace) -> None:
    print("\n".join(list_models(args.pattern)))
    print("... and any timm model as timm:<name>", file=sys.stderr)


def _record_info(args: argparse.Namespace) -> None:
    record = load_record(args.record, data_root=args.data)
    poisoned = record.poisoned_test
    targets = ", ".join(f"{t}: {n}" for t, n in sorted(Counter(poisoned.targets.tolist()).items()))
    print(f"record         {record.path}")
    print(f"model          {record.model_name} ({record.num_classes} classes)")
    print(f"dataset        {record.dataset.name} from {record.data_dir} ({len(record.clean_test)} clean test images)")
    print(f"poisoned test  {len(poisoned)} images; target label counts {{{targets}}}")
    if record.train_poison_indices is not None:
        print(f"poisoned train {len(record.train_poison_indices)} indices")
    if record.metadata:
        print(f"other keys     {', '.join(sorted(map(str, record.metadata)))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fire-adapters", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    datasets = commands.add_parser("datasets", help="list datasets and where each was found")
    datasets.add_argument("--data", help="a data root to search first")
    datasets.set_defaults(run=_datasets)
    models = commands.add_parser("models", help="list zoo model names")
    models.add_argument("pattern", nargs="?", default="*")
    models.set_defaults(run=_models)
    info = commands.add_parser("record-info", help="load a BackdoorBench record and summarise it")
    info.add_argument("record", help="the record folder (record/<name>)")
    info.add_argument("--data", help="where the clean dataset is (searched first)")
    info.set_defaults(run=_record_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except FireDefenseError as error:
        print(f"fire-adapters: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

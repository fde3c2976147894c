"""``python -m fire_adapters`` (or ``fire-adapters``): look at datasets, models and records from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fire_adapters.attacks import list_attacks
from fire_adapters.datasets import DATASETS, DatasetNotFoundError, find_dataset
from fire_adapters.factory import RecordRecipe, make_records, model_training
from fire_adapters.models import list_models
from fire_adapters.records import load_record
from fire_adapters.training import OPTIMIZERS
from fire_defense import FireDefenseError
from fire_defense.errors import run_cli


def _datasets(args: argparse.Namespace) -> None:
    if args.data and not Path(args.data).is_dir():
        raise FireDefenseError(f"--data {args.data} is not a folder; point it at the folder that holds the datasets.")
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


def _attack_params(args: argparse.Namespace) -> dict[str, Any]:
    """``--attack-params`` (a JSON object) with ``--all-to-all`` on top."""
    params: Any = {}
    if args.attack_params is not None:
        try:
            params = json.loads(args.attack_params)
        except json.JSONDecodeError as error:
            raise FireDefenseError(
                f"--attack-params is not valid JSON ({error.msg} at character {error.pos}); "
                "pass an object, e.g. '{\"ratio\": 0.05}'."
            ) from None
        if not isinstance(params, dict):
            raise FireDefenseError(
                f"--attack-params must be a JSON object of attack parameters, got {params!r}; "
                "e.g. '{\"ratio\": 0.05}'."
            )
    if args.all_to_all:
        if params.get("all_to_all", True) is not True:
            raise FireDefenseError("--all-to-all contradicts --attack-params' all_to_all; pass only one of them.")
        params["all_to_all"] = True
    return params


def _make_records(args: argparse.Namespace) -> None:
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer}
    schedule = model_training(args.model, {k: v for k, v in given.items() if v is not None})  # the model's own recipe
    attacks = args.attacks.split(",")
    if args.label is not None and len(attacks) > 1:
        raise FireDefenseError(
            f"--label names one attack's records, but --attacks lists {len(attacks)}; make them one at a time."
        )
    params = _attack_params(args)
    recipes = [
        RecordRecipe(dataset, attack, args.model, seed, attack_params=dict(params), train=schedule, label=args.label)
        for dataset in args.dataset.split(",")
        for attack in attacks
        for seed in args.seeds
    ]
    made = make_records(recipes, args.out, args.data, args.device, args.overwrite)
    width = max(48, *(len(recipe.name) for recipe in recipes))
    print(f"{'record':{width}s} {'clean acc':>9s} {'ASR':>7s} {'RA':>7s} {'train s':>8s}")
    for record in made:
        m = record.metrics
        note = " (cached)" if record.cached else ""
        print(
            f"{record.recipe.name:{width}s} {100 * m['test_acc']:8.2f}% {100 * m['test_asr']:6.2f}% "
            f"{100 * m['test_ra']:6.2f}% {record.train_seconds:8.0f}{note}"
        )
    print(f"records in {args.out}")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None


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
    make = commands.add_parser("make-records", help="train backdoored models and save them as BackdoorBench records")
    make.add_argument("--dataset", default="fashionmnist", help="dataset name(s), comma-separated")
    make.add_argument(
        "--attacks", default="badnet,blended,sig,wanet", help=f"comma-separated; from {', '.join(list_attacks())}"
    )
    defaults = RecordRecipe("", "")
    make.add_argument(
        "--attack-params", metavar="JSON", help="attack parameters beyond the defaults, e.g. '{\"ratio\": 0.05}'"
    )
    make.add_argument(
        "--all-to-all", action="store_true", help="label y goes to (y + 1) %% classes (records: <attack>-all2all)"
    )
    make.add_argument("--label", help="the attack's name in the record folder and leaderboard (one attack only)")
    make.add_argument("--model", default=defaults.model, help="zoo model name")
    make.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default 0)")
    recipe = "default: the model's training recipe (fire_adapters.factory.model_training)"
    make.add_argument("--epochs", type=int, help=f"{recipe}; {defaults.train.epochs} for most models")
    make.add_argument("--batch-size", type=int, help=f"{recipe}; {defaults.train.batch_size} for most models")
    make.add_argument("--lr", type=float, help=f"peak one-cycle learning rate ({recipe})")
    make.add_argument("--optimizer", choices=OPTIMIZERS, help=f"{recipe}; sgd for most models")
    make.add_argument("--out", default="records", help="folder for the records (default: records/)")
    make.add_argument("--data", help="where the datasets are (searched first)")
    make.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    make.add_argument("--overwrite", action="store_true", help="rebuild records that exist")
    make.set_defaults(run=_make_records)
    args = parser.parse_args(argv)
    return run_cli("fire-adapters", lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())

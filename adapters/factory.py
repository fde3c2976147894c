"""Backdoored models made to order, saved as BackdoorBench records: the embedded default and its kin.

A :class:`RecordRecipe` names everything a record is made from (dataset, model, attack and its
parameters, seed, training schedule); :func:`make_record` trains the model, evaluates the attack
with the shared :func:`~fire_adapters.training.evaluate`, and writes the record with
BackdoorBench-style ``attack_df.csv`` / ``attack_df_summary.csv``. A finished record is never
rebuilt: the recipe is stored in it and compared on the next call; records are written
atomically, so an interrupted build leaves nothing that looks finished.
"""

from __future__ import annotations

import csv
import functools
import io
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from fire_adapters.attacks import Attack, create_attack
from fire_adapters.datasets import get_dataset_spec, load_dataset
from fire_adapters.models import create_model
from fire_adapters.models.zoo import training_recipe
from fire_adapters.preprocess import with_normalization
from fire_adapters.records import RECORD_FILE, Record, read_record_file, save_record
from fire_adapters.training import TrainConfig, evaluate, train_backdoored_model
from fire_defense import FireDefenseError
from fire_defense.checks import is_integer
from fire_defense.progress import progress_bar

__all__ = [
    "MadeRecord",
    "RecordRecipe",
    "find_made_record",
    "load_attack",
    "make_record",
    "make_records",
    "model_training",
    "prepare_out_dir",
    "summary_csv",
]

METRICS = ("test_acc", "test_asr", "test_ra")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def model_training(model: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """How ``model`` is trained: ``TrainConfig``'s defaults, then the model's own recipe
    (:func:`~fire_adapters.models.zoo.training_recipe`), then ``overrides``.

    Raises:
        FireDefenseError: an override that is not a ``TrainConfig`` setting, or a value it refuses.
    """
    overrides = dict(overrides or {})
    known = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(map(str, overrides)) - set(known))
    if unknown:
        raise FireDefenseError(
            f"{model}'s training has no setting {', '.join(unknown)}; the settings: {', '.join(known)}."
        )
    return TrainConfig(**{**training_recipe(model), **overrides})


@dataclass(frozen=True)
class RecordRecipe:
    """Everything a backdoored-model record is made from.

    Attributes:
        dataset: Dataset name.
        attack: Attack name.
        model: Zoo model name.
        seed: Seeds the attack (poisoned samples, random trigger parts), the model's initialisation and training.
        attack_params: Keyword arguments for the attack beyond its defaults.
        train: The training schedule; ``None``: the model's (:func:`model_training`).
        label: The attack's name in the record's folder name and metadata (the leaderboard's
            ``attack_name``): letters, digits, ``.`` and ``-``. ``None``: the attack's name, with
            ``-all2all`` appended when ``attack_params`` sets ``all_to_all`` (BackdoorBench's
            ``all2all``), so an all-to-all record never takes the all-to-one record's name.
    """

    dataset: str
    attack: str
    model: str = "preactresnet18_w8"
    seed: int = 0
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    train: TrainConfig | None = None
    label: str | None = None

    @property
    def attack_label(self) -> str:
        """The attack as the record names it: :attr:`label`, or the attack's name (``-all2all`` if all-to-all)."""
        if self.label is not None:
            return self.label
        return f"{self.attack}-all2all" if self.attack_params.get("all_to_all") else self.attack

    @property
    def name(self) -> str:
        """The record's folder name."""
        return f"{self.dataset}_{self.model}_{self.attack_label}_seed{self.seed}"

    def __post_init__(self) -> None:
        if not is_integer(self.seed) or self.seed < 0:
            raise FireDefenseError(f"a recipe's seed must be an integer >= 0, got {self.seed!r}.")
        if self.train is None and isinstance(self.model, str):
            object.__setattr__(self, "train", model_training(self.model))
        if not isinstance(self.train, TrainConfig):
            raise FireDefenseError(f"a recipe's train must be a TrainConfig, got {type(self.train).__name__}.")
        if not isinstance(self.attack_params, Mapping) or not all(isinstance(k, str) for k in self.attack_params):
            raise FireDefenseError(
                f"a recipe's attack_params must map parameter names to values, got {self.attack_params!r}."
            )
        clash = {"dataset", "seed"} & set(self.attack_params)
        if clash:
            raise FireDefenseError(
                f"attack_params may not set {', '.join(sorted(clash))}: the recipe sets them itself."
            )
        if self.label is not None and not (isinstance(self.label, str) and _LABEL.fullmatch(self.label)):
            raise FireDefenseError(
                f"a recipe's label names its record folder: use letters, digits, '.' and '-' "
                f"(starting with a letter or digit), got {self.label!r}."
            )

    def create_attack(self) -> Attack:
        """The recipe's attack (no data is read): its parameters are checked here, before any training.

        Raises:
            FireDefenseError: an unknown attack or dataset, or a parameter the attack does not take.
        """
        return create_attack(self.attack, self.dataset, seed=self.seed, **self.attack_params)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as stored in its record (``label`` only when set, so unlabelled records keep their recipe)."""
        stored = {**asdict(self), "attack_params": dict(self.attack_params), "train": self.train.as_dict()}
        if self.label is None:
            del stored["label"]
        return stored


@dataclass(frozen=True)
class MadeRecord:
    """A record :func:`make_record` built or found: where, the attack's metrics, and the training time."""

    path: Path
    recipe: RecordRecipe
    metrics: dict[str, float]
    train_seconds: float
    cached: bool


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], index: Sequence[str] | None = None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["", *columns] if index else columns)
    for i, row in enumerate(rows):
        values = [row.get(c, "") for c in columns]
        writer.writerow([index[i], *values] if index else values)
    return out.getvalue()


def summary_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """BackdoorBench's ``*_df_summary.csv``: rows ``last``, ``valid_max``, ``exist_nan_value`` per column."""

    def column(name: str) -> list[float]:
        return [float(r[name]) for r in rows if r.get(name, "") != ""]

    last = {c: column(c)[-1] if column(c) else "" for c in columns}
    valid = {c: max((v for v in column(c) if v == v), default="") for c in columns}
    nan = {c: any(v != v for v in column(c)) for c in columns}
    return _csv([last, valid, nan], columns, index=["last", "valid_max", "exist_nan_value"])


def load_attack(record: Record) -> Attack:
    """The attack that made ``record`` (for a record made here), with its trigger state restored."""
    meta = record.metadata
    if "attack_params" not in meta:
        raise FireDefenseError(f"{record.path} holds no attack parameters; only records made by make-records do.")
    params = dict(meta["attack_params"])
    # "attack" is the record's label (e.g. badnet-all2all); the recipe, where there is one, names the registered attack.
    recipe = meta.get("recipe")
    name = recipe.get("attack", meta["attack"]) if isinstance(recipe, Mapping) else meta["attack"]
    attack = create_attack(name, params.pop("dataset"), **params)
    return attack.load_state_dict(meta.get("attack_state", {}))


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and test-write it, so a bad ``--out`` fails before any training, not after.

    Raises:
        FireDefenseError: it is a file, or cannot be created or written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FireDefenseError(f"the output folder {out_dir} is a file; pass a folder for the records (--out).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise FireDefenseError(
            f"cannot write records into {out_dir} ({error.strerror or type(error).__name__}); "
            "pass a writable folder (--out)."
        ) from None
    return out_dir


def find_made_record(recipe: RecordRecipe, out_dir: str | Path) -> MadeRecord | None:
    """The record made from ``recipe`` in ``out_dir``, if there is one (nothing is trained).

    Raises:
        FireDefenseError: a record of that name was made from another recipe.
    """
    path = Path(out_dir) / recipe.name
    if not (path / RECORD_FILE).is_file():
        return None
    _, stored = read_record_file(path)
    if stored.get("recipe") != recipe.as_dict():
        raise FireDefenseError(
            f"{path} was made from another recipe ({stored.get('recipe')}); pass overwrite=True (--overwrite) "
            "to rebuild it, or choose another output folder."
        )
    # a recipe names only the parameters set explicitly: an attack whose defaults changed since makes another trigger
    settings = recipe.create_attack().params()
    if "attack_params" in stored and stored["attack_params"] != settings:
        changed = sorted(
            k
            for k in settings.keys() | stored["attack_params"].keys()
            if stored["attack_params"].get(k) != settings.get(k)
        )
        raise FireDefenseError(
            f"{path} was made with {recipe.attack} settings its defaults no longer give ({', '.join(changed)} "
            "changed); pass overwrite=True (--overwrite) to rebuild it, or choose another output folder."
        )
    return MadeRecord(path, recipe, dict(stored["attack_metrics"]), float(stored["train_seconds"]), cached=True)


def make_record(
    recipe: RecordRecipe,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> MadeRecord:
    """Train a backdoored model as ``recipe`` says and save it as a record in ``out_dir/<recipe.name>``.

    Returns the existing record instead if one made from the same recipe is there.

    Raises:
        FireDefenseError: a record of that name was made from another recipe (and ``overwrite`` is off).
    """
    path = Path(out_dir) / recipe.name
    if not overwrite and (found := find_made_record(recipe, out_dir)) is not None:
        return found
    prepare_out_dir(out_dir)
    spec = get_dataset_spec(recipe.dataset)
    train = load_dataset(spec, "train", root=data_root)
    test = load_dataset(spec, "test", root=data_root)
    attack = recipe.create_attack()
    positions = attack.train_positions(train.labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = create_model(recipe.model, spec.num_classes)
    history = train_backdoored_model(model, attack, train, positions, recipe.train, recipe.seed, device, progress)
    poisoned_test = attack.poison(test, attack.test_positions(test.labels))
    metrics = evaluate(with_normalization(model, spec), test, poisoned_test, device)
    seconds = sum(row["seconds"] for row in history)
    history[-1].update(metrics)
    columns = ["epoch", "train_loss", "train_acc", *METRICS, "seconds"]
    save_record(
        path,
        model=model,
        model_name=recipe.model,
        num_classes=spec.num_classes,
        dataset=spec,
        poisoned_test=poisoned_test,
        test_size=len(test),
        # A static trigger poisoned a fixed set of training samples; a learned one poisoned every batch anew.
        poisoned_train=attack.poison(train, positions) if attack.static_trigger else None,
        train_size=len(train),
        metadata={
            "attack": recipe.attack_label,
            "attack_params": attack.params(),
            "attack_state": attack.state_dict(),
            "recipe": recipe.as_dict(),
            "attack_metrics": metrics,
            "train_seconds": seconds,
        },
        extra_files={"attack_df.csv": _csv(history, columns), "attack_df_summary.csv": summary_csv(history, columns)},
        overwrite=overwrite,
    )
    return MadeRecord(path, recipe, metrics, seconds, cached=False)


class _Mapper(Protocol):
    def map(self, fn: Callable[[RecordRecipe], MadeRecord], items: Sequence[RecordRecipe]) -> Iterable[tuple]: ...


def make_records(
    recipes: Sequence[RecordRecipe],
    out_dir: str | Path,
    data_root: str | Path | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    executor: _Mapper | None = None,
) -> list[MadeRecord]:
    """:func:`make_record` for each recipe, with an overall progress bar; finished ones are kept (not rebuilt).

    Args:
        executor: Trains the missing records: anything whose ``map(fn, items)`` yields ``(item, fn(item))``
            as each finishes, e.g. ``fire_bench``'s executors (several at once). Default: one after
            another in this process.
    """
    for recipe in recipes:  # a bad attack parameter fails now, not after the other records trained
        recipe.create_attack()
    by_name: dict[str, RecordRecipe] = {}
    for recipe in recipes:
        if by_name.setdefault(recipe.name, recipe) != recipe:
            raise FireDefenseError(
                f"two different recipes would make the record {recipe.name}; give one of them a label (--label)."
            )
    out_dir = prepare_out_dir(out_dir)
    found = {} if overwrite else {r.name: m for r in recipes if (m := find_made_record(r, out_dir)) is not None}
    todo = [recipe for recipe in recipes if recipe.name not in found]
    if todo and progress:
        tqdm.write(f"training {len(todo)} of {len(recipes)} records into {out_dir}")
    train = functools.partial(
        make_record, out_dir=out_dir, data_root=data_root, device=device, overwrite=overwrite, progress=progress
    )
    finished = executor.map(train, todo) if executor is not None else ((recipe, train(recipe)) for recipe in todo)
    bar = progress_bar(finished, total=len(todo), desc="records", unit="record", disable=not progress, min_total=2)
    for recipe, made in bar:
        found[recipe.name] = made
        if progress:
            tqdm.write(f"{recipe.name}: {_format_metrics(made.metrics)} in {made.train_seconds:.0f} s of training")
    return [found[recipe.name] for recipe in recipes]


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items())

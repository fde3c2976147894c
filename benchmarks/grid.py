"""A benchmark grid, defined as data (YAML): which records, which defenses, the defender's budget, the seeds.

``benchmarks/grids/default.yaml`` (the embedded default) and ``quick.yaml`` ship with the package;
``load_grid("default")`` finds them by name, any other argument is a path. Every key is checked
when the grid is loaded, before any record is trained: a misspelt one is an error naming the keys
that exist, not a silently ignored setting; every value's type and range (each section checks its
own in ``__post_init__``, so a ``dataclasses.replace`` is checked too); every defense's name and
parameters (each one a parameter of its constructor, of the type it declares). Each problem is one
line naming the key.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fire_bench.defenses import DEFENSES
from fire_defense import FireDefenseError
from fire_defense.checks import is_finite_number, is_integer
from fire_defense.registry import keyword_parameters

if TYPE_CHECKING:
    from fire_adapters.factory import RecordRecipe
    from fire_adapters.training import TrainConfig

__all__ = [
    "GRIDS_DIR",
    "AttackSpec",
    "DefenseSpec",
    "Grid",
    "KCurve",
    "Latency",
    "MakeRecords",
    "Protocol",
    "check_defense",
    "load_grid",
]

GRIDS_DIR = Path(__file__).parent / "grids"
DEFAULT_MODEL = "preactresnet18_w8"  # make:'s model when it names none


def _integer(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if not (is_integer(value) and value >= minimum) and not (optional and value is None):
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise FireDefenseError(f"{name} must be {allowed}, got {value!r}.")


def _number(name: str, value: Any, low: float, open_low: bool = False) -> None:
    if not (is_finite_number(value) and (value > low if open_low else value >= low)):
        raise FireDefenseError(f"{name} must be a finite number {'>' if open_low else '>='} {low:g}, got {value!r}.")


def _integers(owner: object, name: str, minimum: int) -> None:
    """``owner.name``: a non-empty list of distinct integers >= ``minimum`` (stored as a tuple)."""
    value = getattr(owner, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(owner, name, value)
    valid = isinstance(value, tuple) and value and all(is_integer(v) and v >= minimum for v in value)
    if not valid or len(set(value)) != len(value):
        raise FireDefenseError(f"{name} must be a non-empty list of distinct integers >= {minimum}, got {value!r}.")


def _names(owner: object, name: str, known: Any, kind: str) -> None:
    """``owner.name``: a non-empty list of names ``known`` holds (stored as a tuple)."""
    value = getattr(owner, name)
    if isinstance(value, list):
        value = tuple(value)
        object.__setattr__(owner, name, value)
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) for v in value):
        raise FireDefenseError(f"{name} must be a non-empty list of {kind} names, got {value!r}.")
    for entry in value:
        if entry not in known:
            raise FireDefenseError(f"{name}: {known.unknown_message(entry)}")


def _hints(cls: type) -> dict[str, Any]:
    """The declared types of ``cls``'s constructor arguments (a subclass's win); those that cannot be read are
    left out (and not checked)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            try:
                hints.update(typing.get_type_hints(klass.__init__))
            except Exception:  # noqa: BLE001  (an annotation that does not resolve: that parameter goes unchecked)
                continue
    return hints


def _matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a declared type (``int``, ``float``, ``str``, ``bool``, unions, ``Literal``,
    sequences); anything else is not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return is_integer(value)
    if hint is float:
        return is_finite_number(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if hint is None or hint is type(None):
        return "null"
    return "a finite number" if hint is float else getattr(hint, "__name__", str(hint))


def check_defense(spec: DefenseSpec) -> None:
    """Refuse a defense the grid could not run: an unknown name, parameters its constructor does not take or
    of another type than it declares, ``seed`` (the grid's seeds set it), or batch sizes below 1.

    Raises:
        FireDefenseError: one line naming the parameter and what it takes.
    """
    if spec.name not in DEFENSES:
        raise FireDefenseError(DEFENSES.unknown_message(spec.name))
    if not isinstance(spec.params, dict) or not all(isinstance(k, str) for k in spec.params):
        raise FireDefenseError(f"params must be a mapping of parameter names to values, got {spec.params!r}.")
    cls = DEFENSES.get(spec.name)
    known = [name for name in keyword_parameters(cls) if name != "seed"]  # the grid's seeds set it
    unknown = sorted(set(spec.params) - set(known) - {"seed"})
    if unknown:
        raise FireDefenseError(
            f"{spec.name} has no parameter {', '.join(unknown)}; its parameters: {', '.join(known)}."
        )
    if "seed" in spec.params:
        raise FireDefenseError(f"params.seed: the grid's seeds seed {spec.name}; remove it from params.")
    hints = _hints(cls)
    for key, value in spec.params.items():
        if key in hints and value is not None and not _matches(value, hints[key]):
            raise FireDefenseError(f"params.{key} of {spec.name} must be {_type_name(hints[key])}, got {value!r}.")
        if key in ("batch_size", "pass_batch"):
            _integer(f"params.{key}", value, 1, optional=True)
    from fire_bench.defenses import create_defense

    create_defense(spec.name, **spec.params)  # the constructor itself takes them


@dataclass(frozen=True)
class AttackSpec:
    """An entry of ``make.attacks`` given as a mapping: the registered attack, its parameters beyond the
    defaults, and the label its records carry (``fire_adapters.factory.RecordRecipe.label``; ``None``: the
    attack's name, ``<name>-all2all`` with ``all_to_all: true``)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        from fire_adapters.attacks import ATTACKS

        if not isinstance(self.name, str):
            raise FireDefenseError(f"name must be an attack name, got {self.name!r}.")
        if self.name not in ATTACKS:
            raise FireDefenseError(ATTACKS.unknown_message(self.name))
        if not isinstance(self.params, dict) or not all(isinstance(k, str) for k in self.params):
            raise FireDefenseError(f"params must be a mapping of parameter names to values, got {self.params!r}.")
        if self.label is not None and not isinstance(self.label, str):
            raise FireDefenseError(f"label must be a string, got {self.label!r}.")


def _attacks(owner: MakeRecords) -> None:
    """``owner.attacks``: a non-empty list of attack names or :class:`AttackSpec` mappings (stored as a tuple,
    mappings as ``AttackSpec``)."""
    from fire_adapters.attacks import ATTACKS

    value = owner.attacks
    if not isinstance(value, list | tuple) or not value:
        raise FireDefenseError(f"attacks must be a non-empty list of attack names or mappings, got {value!r}.")
    entries: list[str | AttackSpec] = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            if entry not in ATTACKS:
                raise FireDefenseError(f"attacks: {ATTACKS.unknown_message(entry)}")
            entries.append(entry)
        elif isinstance(entry, AttackSpec):
            entries.append(entry)
        elif isinstance(entry, dict):
            entries.append(_build(AttackSpec, entry, f"attacks[{i}]"))
        else:
            raise FireDefenseError(
                f"attacks[{i}] must be an attack name or a mapping {{name, params, label}}, got {entry!r}."
            )
    object.__setattr__(owner, "attacks", tuple(entries))


def _models(owner: MakeRecords) -> None:
    """``owner.models``: a non-empty list of distinct zoo or ``timm:`` names, from ``models`` or ``model`` (stored
    as a tuple; ``model`` alone means ``models: [model]``, neither the default model)."""
    from fire_adapters import MODELS
    from fire_adapters.models.zoo import TIMM_PREFIX

    if owner.model is not None and owner.models is not None:
        raise FireDefenseError("give model (one name) or models (a list), not both.")
    key, value = ("model", owner.model) if owner.model is not None else ("models", owner.models)
    names = (DEFAULT_MODEL,) if value is None else (value,) if key == "model" else value
    if isinstance(names, list):
        names = tuple(names)
    if not isinstance(names, tuple) or not names or (key == "model" and not isinstance(value, str)):
        want = "a model name" if key == "model" else "a non-empty list of model names"
        raise FireDefenseError(f"{key} must be {want}, got {value!r}.")
    for name in names:
        if not isinstance(name, str) or not (name in MODELS or name.startswith(TIMM_PREFIX)):
            known = MODELS.unknown_message(str(name))
            raise FireDefenseError(f"{key}: {known} Any timm model works as '{TIMM_PREFIX}<name>'.")
    if len(set(names)) != len(names):
        raise FireDefenseError(f"models must be distinct, got {list(names)!r}.")
    object.__setattr__(owner, "models", names)


def _training(owner: MakeRecords) -> None:
    """``owner.training``: a mapping of the grid's models to ``TrainConfig`` settings, each checked now."""
    from fire_adapters.factory import model_training

    value = owner.training
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise FireDefenseError(
            f"training must map model names to training settings, e.g. {{vit_p4_d6: {{epochs: 6}}}}, got {value!r}."
        )
    for model, settings in value.items():
        if model not in owner.models:
            raise FireDefenseError(
                f"training.{model}: not one of the grid's models ({', '.join(owner.models)}); "
                "add it to models or remove its entry."
            )
        try:
            model_training(model, settings)
        except FireDefenseError as error:
            raise FireDefenseError(f"training.{model}: {error}") from None


@dataclass(frozen=True)
class MakeRecords:
    """Records to build (and cache) with the record factory: every dataset x model x attack x seed.

    An entry of ``attacks`` is a registered attack's name, or a mapping ``{name, params, label}``
    (:class:`AttackSpec`), e.g. ``{name: badnet, params: {all_to_all: true}}``, whose records are
    named ``badnet-all2all``. Every entry's parameters are checked against its attack when the grid
    is loaded, and two entries may not make records of the same name.

    ``model`` (one name) or ``models`` (a list; neither: ``preactresnet18_w8``). Each model trains
    with ``TrainConfig``'s defaults, then its own recipe from the zoo
    (``fire_adapters.models.zoo.TRAINING``), then ``training[model]`` (any ``TrainConfig``
    setting); ``epochs`` is the epochs of a model whose recipe and ``training`` entry set none.
    """

    datasets: tuple[str, ...] = ("fashionmnist",)
    attacks: tuple[str | AttackSpec, ...] = ("badnet", "blended", "sig", "wanet")
    model: str | None = None
    models: tuple[str, ...] | None = None
    seeds: tuple[int, ...] = (0,)
    epochs: int = 4
    training: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fire_adapters import DATASETS

        _names(self, "datasets", DATASETS, "dataset")
        _attacks(self)
        _models(self)
        _integers(self, "seeds", 0)
        _integer("epochs", self.epochs, 1)
        _training(self)
        made: dict[str, int] = {}
        for i, entry in enumerate(self.attacks):
            for dataset in self.datasets:
                try:
                    recipe = self._recipe(dataset, self.models[0], entry, self.seeds[0])
                    recipe.create_attack()  # the attack takes these parameters on this dataset
                except FireDefenseError as error:
                    raise FireDefenseError(f"attacks[{i}]: {error}") from None
            if made.setdefault(recipe.attack_label, i) != i:
                raise FireDefenseError(
                    f"attacks[{made[recipe.attack_label]}] and attacks[{i}] both make {recipe.attack_label} records; "
                    "give one of them another label."
                )

    def train_config(self, model: str) -> TrainConfig:
        """How ``model`` is trained: its recipe (:func:`fire_adapters.factory.model_training`), ``epochs`` where
        neither the recipe nor ``training[model]`` sets them, and ``training[model]`` over both."""
        from fire_adapters.factory import model_training
        from fire_adapters.models.zoo import training_recipe

        settings = dict(self.training.get(model, {}))
        if "epochs" not in training_recipe(model):
            settings.setdefault("epochs", self.epochs)
        return model_training(model, settings)

    def _recipe(self, dataset: str, model: str, entry: str | AttackSpec, seed: int) -> RecordRecipe:
        from fire_adapters.factory import RecordRecipe

        spec = entry if isinstance(entry, AttackSpec) else AttackSpec(entry)
        return RecordRecipe(dataset, spec.name, model, seed, dict(spec.params), self.train_config(model), spec.label)

    def recipes(self) -> list[RecordRecipe]:
        """The recipe of every record to make: dataset x model x attack x seed."""
        return [
            self._recipe(dataset, model, entry, seed)
            for dataset in self.datasets
            for model in self.models
            for entry in self.attacks
            for seed in self.seeds
        ]


@dataclass(frozen=True)
class Protocol:
    """The defender's budget and the evaluation's size (``fire_bench.protocol``).

    ``eval_clean`` / ``eval_poisoned`` cap the evaluation part by a seeded subsample (``None``: all of it).
    """

    clean_size: int = 500
    k: int = 10
    defender_share: float = 0.1
    eval_clean: int | None = 1000
    eval_poisoned: int | None = 1000

    def __post_init__(self) -> None:
        _integer("clean_size", self.clean_size, 1)
        _integer("k", self.k, 1)
        if not (is_finite_number(self.defender_share) and 0 < self.defender_share < 1):
            raise FireDefenseError(
                f"defender_share must be a number > 0 and < 1 (the rest of the test split is the evaluation), "
                f"got {self.defender_share!r}."
            )
        _integer("eval_clean", self.eval_clean, 1, optional=True)
        _integer("eval_poisoned", self.eval_poisoned, 1, optional=True)


@dataclass(frozen=True)
class DefenseSpec:
    """One defense of the grid: its registry name, parameters, and the label it is reported under."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise FireDefenseError(f"name must be a defense name, got {self.name!r}.")
        if not isinstance(self.label, str):
            raise FireDefenseError(f"label must be a string, got {self.label!r}.")
        if not self.label:
            object.__setattr__(self, "label", self.name)


@dataclass(frozen=True)
class Latency:
    """Per-sample latency, measured after every cell, one defense at a time (``fire_bench.cells.LatencyCell``).

    At each batch size: the median over up to ``rounds`` of the defense's time over the undefended
    model's, the two alternated, each timed over at least ``min_seconds``; after ``min_rounds``, the
    timing stops once the median's standard error is below ``precision`` of it. A defense that makes
    many forward passes gets fewer rounds: as many as fit in ``max_seconds`` of its own time per
    batch size, or only its first call if one round would not fit; its ratio is large, so that
    measures it well. ``threads``: PyTorch's intra-op threads while timing.
    """

    batch_sizes: tuple[int, ...] = (1, 128)
    rounds: int = 21
    min_rounds: int = 5
    precision: float = 0.01
    min_seconds: float = 0.03
    max_seconds: float = 2.5
    threads: int = 1

    def __post_init__(self) -> None:
        _integers(self, "batch_sizes", 1)
        _integer("rounds", self.rounds, 1)
        _integer("min_rounds", self.min_rounds, 1)
        _number("precision", self.precision, 0)
        _number("min_seconds", self.min_seconds, 0)
        _number("max_seconds", self.max_seconds, 0, open_low=True)
        _integer("threads", self.threads, 1)


@dataclass(frozen=True)
class KCurve:
    """FIRE's streaming mode (the ``fire-stream`` defense): its metrics after each ``k`` poisoned inputs seen.

    Each ``k`` is an ordinary cell, the protocol's ``k`` set to it; ``reservoir``: how many of the
    inputs are held at once, to choose the layer from (``fire_bench.defenses.fire_stream``).
    """

    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    mode: str = "match"
    reservoir: int = 100

    def __post_init__(self) -> None:
        _integers(self, "ks", 1)
        _integer("reservoir", self.reservoir, 1)

    @property
    def defense(self) -> DefenseSpec:
        """The streaming defense every cell of the curve runs."""
        return DefenseSpec("fire-stream", {"mode": self.mode, "reservoir": self.reservoir})


@dataclass(frozen=True)
class Grid:
    """A whole benchmark: records (made, or a folder of existing ones), protocol, seeds, defenses."""

    name: str
    defenses: tuple[DefenseSpec, ...]
    # one block of records to make, or several (a YAML list: e.g. every attack on one model, a few on others)
    make: MakeRecords | tuple[MakeRecords, ...] | None = MakeRecords()
    records: str | None = None  # a folder of records (ours or BackdoorBench's record/), instead of make
    protocol: Protocol = Protocol()
    seeds: tuple[int, ...] = (0,)
    latency: Latency | None = Latency()  # None: no latency phase
    k_curve: KCurve | None = KCurve()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or set(self.name) & {"/", "\\"} or self.name in (".", ".."):
            raise FireDefenseError(f"name must be a plain name (it names the records folder), got {self.name!r}.")
        if self.records is not None and not isinstance(self.records, str | Path):
            raise FireDefenseError(f"records must be a folder path, got {self.records!r}.")
        _integers(self, "seeds", 0)
        for key, cls in (("make", MakeRecords), ("protocol", Protocol), ("latency", Latency), ("k_curve", KCurve)):
            value = getattr(self, key)
            blocks = key == "make" and isinstance(value, tuple) and value and all(isinstance(v, cls) for v in value)
            if not isinstance(value, cls) and not blocks and not (value is None and key != "protocol"):
                raise FireDefenseError(f"{key} must be a mapping of settings, got {value!r}.")
        if not isinstance(self.defenses, tuple) or not self.defenses:
            raise FireDefenseError("list at least one defense under 'defenses'.")
        if self.make is not None:
            names = [recipe.name for recipe in self.recipes()]
            repeated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
            if repeated:
                raise FireDefenseError(f"make: two blocks make the record {repeated[0]}; remove it from one of them.")

    def recipes(self) -> list[RecordRecipe]:
        """The recipe of every record ``make`` builds, block by block."""
        if self.make is None:
            return []
        blocks = self.make if isinstance(self.make, tuple) else (self.make,)
        return [recipe for block in blocks for recipe in block.recipes()]


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` with unknown keys and wrong shapes reported as one line naming ``where``."""
    if not isinstance(data, dict):
        raise FireDefenseError(f"{where} must be a mapping, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FireDefenseError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise FireDefenseError(f"{where}: {error}.") from None
    except FireDefenseError as error:
        raise FireDefenseError(f"{where}: {error}") from None


def _defense(data: Any, where: str) -> DefenseSpec:
    spec = _build(DefenseSpec, data, where)
    try:
        check_defense(spec)
    except FireDefenseError as error:
        raise FireDefenseError(f"{where}: {error}") from None
    return spec


def load_grid(name_or_path: str | Path) -> Grid:
    """The grid shipped under ``name_or_path`` (``'default'``, ``'quick'``) or read from that YAML file.

    Raises:
        FireDefenseError: no such grid or file, invalid YAML, unknown keys or defenses, a value of the wrong
            type or out of range, a defense parameter its constructor does not take, duplicate labels.
    """
    path = Path(name_or_path)
    if not path.suffix and (GRIDS_DIR / f"{name_or_path}.yaml").is_file():
        path = GRIDS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in GRIDS_DIR.glob("*.yaml")))
        raise FireDefenseError(f"no grid file {path}; give a YAML path or one of the shipped grids: {shipped}.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise FireDefenseError(f"{path} is not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise FireDefenseError(f"{path} must hold a mapping of grid settings.")
    data = {"name": path.stem, **data}
    defenses = data.get("defenses")
    if not isinstance(defenses, list) or not defenses:
        raise FireDefenseError(f"{path}: list at least one defense under 'defenses'.")
    data["defenses"] = tuple(_defense(d, f"{path}: defenses[{i}]") for i, d in enumerate(defenses))
    labels = [d.label for d in data["defenses"]]
    if len(set(labels)) != len(labels):
        raise FireDefenseError(f"{path}: defense labels must be unique; give repeated defenses a 'label'.")
    if "none" not in {d.name for d in data["defenses"]}:
        raise FireDefenseError(f"{path}: include the 'none' defense, the reference for DER and latency.")
    sections = {"make": MakeRecords, "protocol": Protocol, "latency": Latency, "k_curve": KCurve}
    for key, cls in sections.items():
        if key == "make" and isinstance(data.get(key), list) and data[key]:  # several blocks of records
            data[key] = tuple(_build(cls, block, f"{path}: make[{i}]") for i, block in enumerate(data[key]))
        elif data.get(key) is not None:
            data[key] = _build(cls, data[key], f"{path}: {key}")
    if data.get("k_curve") is not None:
        try:
            check_defense(data["k_curve"].defense)
        except FireDefenseError as error:
            raise FireDefenseError(f"{path}: k_curve: {error}") from None
    if data.get("records") is not None:
        data["make"] = None
    return _build(Grid, data, str(path))

"""A benchmark grid, defined as data (YAML): which records, which defenses, the defender's budget, the seeds.

``benchmarks/grids/default.yaml`` (the embedded default) and ``quick.yaml`` ship with the package;
``load_grid("default")`` finds them by name, any other argument is a path. Every key is checked:
a misspelt one is an error naming the keys that exist, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fire_bench.defenses import DEFENSES
from fire_defense import FireDefenseError

__all__ = ["GRIDS_DIR", "DefenseSpec", "Grid", "KCurve", "Latency", "MakeRecords", "Protocol", "load_grid"]

GRIDS_DIR = Path(__file__).parent / "grids"


@dataclass(frozen=True)
class MakeRecords:
    """Records to build (and cache) with the record factory: every dataset x attack x seed."""

    datasets: tuple[str, ...] = ("fashionmnist",)
    attacks: tuple[str, ...] = ("badnet", "blended", "sig", "wanet")
    model: str = "preactresnet18_w8"
    seeds: tuple[int, ...] = (0,)
    epochs: int = 4


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


@dataclass(frozen=True)
class DefenseSpec:
    """One defense of the grid: its registry name, parameters, and the label it is reported under."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
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


@dataclass(frozen=True)
class KCurve:
    """FIRE's streaming mode (the ``fire-stream`` defense): its metrics after each ``k`` poisoned inputs seen.

    Each ``k`` is an ordinary cell, the protocol's ``k`` set to it; ``warmup``: how many of the first
    inputs choose the layer (``fire_bench.defenses.fire_stream``).
    """

    ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    mode: str = "match"
    warmup: int = 10

    @property
    def defense(self) -> DefenseSpec:
        """The streaming defense every cell of the curve runs."""
        return DefenseSpec("fire-stream", {"mode": self.mode, "warmup": self.warmup})


@dataclass(frozen=True)
class Grid:
    """A whole benchmark: records (made, or a folder of existing ones), protocol, seeds, defenses."""

    name: str
    defenses: tuple[DefenseSpec, ...]
    make: MakeRecords | None = MakeRecords()
    records: str | None = None  # a folder of records (ours or BackdoorBench's record/), instead of make
    protocol: Protocol = Protocol()
    seeds: tuple[int, ...] = (0,)
    latency: Latency | None = Latency()  # None: no latency phase
    k_curve: KCurve | None = KCurve()


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


def _defense(data: Any, where: str) -> DefenseSpec:
    spec = _build(DefenseSpec, data, where)
    if spec.name not in DEFENSES:
        raise FireDefenseError(f"{where}: {DEFENSES.unknown_message(spec.name)}")
    if not isinstance(spec.params, dict):
        raise FireDefenseError(f"{where}: params must be a mapping.")
    return spec


def load_grid(name_or_path: str | Path) -> Grid:
    """The grid shipped under ``name_or_path`` (``'default'``, ``'quick'``) or read from that YAML file.

    Raises:
        FireDefenseError: no such grid or file, invalid YAML, unknown keys or defenses, duplicate labels.
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
        if data.get(key) is not None:
            data[key] = _build(cls, data[key], f"{path}: {key}")
    if data.get("records") is not None:
        data["make"] = None
    return _build(Grid, data, str(path))

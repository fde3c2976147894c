"""FIRE as a BackdoorBench defense, run from its checkout like any of its defenses.

BackdoorBench (SCLBD/BackdoorBench) writes each defense as a class with one interface: built from
parsed arguments laid over a YAML config, ``add_arguments(parser)``, ``set_result(result_file)``,
``set_logger()``, ``mitigation()`` and ``defense(result_file)``. :class:`FireDefense` follows it and
derives from BackdoorBench's ``defense.base.defense`` when that imports (``object`` otherwise). Its
numbers come from the benchmark's one evaluation (:func:`fire_bench.evaluation.evaluate`), as every
grid cell's do: the record read with our safe loader, the protocol's split
(:func:`fire_bench.protocol.split_record`; the defender's clean training samples by ``clean_size``,
BackdoorBench's ``--ratio`` or its ``--index``), the ``fire`` defense fitted on them and on ``k``
poisoned inputs from the held-out part of the poisoned test set, the undefended model and FIRE
scored on the whole evaluation part (a protocol without subsample caps, as the ``fire`` grid's).

It writes into ``record/<result_file>/defense/fire/``: ``defense_result.pt`` (BackdoorBench's format;
the model is the record's, unchanged, as FIRE repairs at inference), ``fire_state.pt`` (FIRE's
directions, :meth:`fire_defense.FIRE.save`), ``fire_df_summary.csv`` and ``log/<time>.log``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fire_adapters import RECORD_FILE, Record, get_dataset_spec, load_record
from fire_adapters.factory import summary_csv
from fire_bench.atomic import write_atomically
from fire_bench.backdoorbench.install import packaged_config
from fire_bench.evaluation import METRICS, evaluate, with_der
from fire_bench.grid import DefenseSpec, Protocol
from fire_bench.protocol import describe, split_record
from fire_defense import MODES, FireDefenseError, __version__, drop_none, resolve_device
from fire_defense.errors import first_line, run_cli

__all__ = ["FireDefense", "main"]

LOGGER = "fire_bench.backdoorbench"


@dataclass(frozen=True)
class _Option:
    kind: type
    help: str
    nullable: bool = False  # may stay unset after the YAML and the command line are merged


# Every option the YAML config and the command line may set (BackdoorBench's names where it has one).
_OPTIONS: dict[str, _Option] = {
    "result_file": _Option(str, "the record: the folder record/<result_file>/ under BackdoorBench's root", True),
    "dataset": _Option(str, "the record's dataset (cifar10, cifar100, gtsrb, tiny, mnist, ...), checked", True),
    "dataset_path": _Option(str, "folder with the clean data (default: data/ beside record/)", True),
    "device": _Option(str, "auto, cpu, cuda or cuda:N"),
    "batch_size": _Option(int, "batch size of FIRE's passes and of the evaluation (default: theirs)", True),
    "random_seed": _Option(int, "seed of the defender/evaluation split and of the k poisoned inputs"),
    "index": _Option(str, "text file of the clean training indices the defender gets (wins over ratio)", True),
    "ratio": _Option(float, "share of the clean training split the defender gets (wins over clean_size)", True),
    "clean_size": _Option(int, "clean training samples the defender gets", True),
    "k": _Option(int, "poisoned inputs FIRE estimates from, drawn from the held-out part of the test split"),
    "defender_share": _Option(float, "share of the test split held out for the defender, never evaluated"),
    "mode": _Option(str, f"FIRE's repair: {', '.join(MODES)}"),
    "layers": _Option(str, "'auto' or comma-separated layer names of the classifier (e.g. 1.layer3)"),
    "fpr": _Option(float, "clean false-positive rate that sets the project/gate thresholds"),
}


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _backdoorbench_base() -> type:
    """BackdoorBench's ``defense.base.defense`` when it imports (its root on ``sys.path``), else ``object``."""
    try:
        from defense.base import defense as base
    except ImportError:
        return object
    return base if isinstance(base, type) else object


def _read_config(path: Path | None) -> dict[str, Any]:
    """The options a YAML config sets (our packaged ``config.yaml`` when ``path`` is None), checked by name."""
    where = "fire-defense's default config" if path is None else str(path)
    try:
        text = packaged_config() if path is None else path.read_text()
        values = yaml.safe_load(text)
    except OSError as error:
        raise FireDefenseError(
            f"cannot read the YAML config {path} ({error.strerror or first_line(error)}); pass --yaml_path "
            "./config/defense/fire/<dataset>.yaml (`fire-bench backdoorbench install --root .` writes them)."
        ) from None
    except yaml.YAMLError as error:
        raise FireDefenseError(f"{where} is not valid YAML ({first_line(error)}).") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise FireDefenseError(f"{where} must be a mapping of option: value, not a {type(values).__name__}.")
    unknown = sorted(map(str, set(values) - set(_OPTIONS)))
    if unknown:
        raise FireDefenseError(f"{where} sets unknown options {', '.join(unknown)}; known: {', '.join(_OPTIONS)}.")
    return values


def _checked(values: dict[str, Any]) -> argparse.Namespace:
    """The merged options as a namespace, each of its option's type, and set unless it may stay unset."""
    for name, option in _OPTIONS.items():
        value = values.get(name)
        if value is None:
            if not option.nullable:
                raise FireDefenseError(f"option {name} is not set; put it in the YAML config or pass --{name}.")
            continue
        kinds = (int, float) if option.kind is float else (option.kind,)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise FireDefenseError(f"option {name} must be {_KIND_NAMES[option.kind]}, got {value!r}.")
    if values["mode"] not in MODES:
        raise FireDefenseError(f"unknown mode {values['mode']!r}; use one of {', '.join(MODES)}.")
    if all(values.get(name) is None for name in ("index", "ratio", "clean_size")):
        raise FireDefenseError("set the defender's clean data: clean_size, ratio or index (YAML or command line).")
    if values.get("dataset") is not None:
        get_dataset_spec(values["dataset"])  # an unknown name fails here, before any loading
    return argparse.Namespace(**{name: values.get(name) for name in _OPTIONS})


class FireDefense(_backdoorbench_base()):
    """FIRE under BackdoorBench's defense interface (see the module docstring).

    Args:
        args: Parsed arguments (see :meth:`add_arguments`); those that are not None override the YAML
            config at ``args.yaml_path``.
        root: BackdoorBench's root, the folder holding ``record/`` (default: the current directory, as
            BackdoorBench runs its scripts from there). Without ``--yaml_path``, the config is
            ``config/defense/fire/config.yaml`` under it, or our packaged one if that is absent.

    Raises:
        FireDefenseError: an unreadable or invalid config, an unknown option, dataset or device.
    """

    def __init__(self, args: argparse.Namespace, root: str | Path | None = None) -> None:
        self.root = Path.cwd() if root is None else Path(root)
        yaml_path = getattr(args, "yaml_path", None)
        if yaml_path is None and (self.root / "config/defense/fire/config.yaml").is_file():
            yaml_path = self.root / "config/defense/fire/config.yaml"
        merged = _read_config(None if yaml_path is None else Path(yaml_path))
        merged.update({k: v for k, v in vars(args).items() if k in _OPTIONS and v is not None})
        self.args = _checked(merged)
        self.device = resolve_device(self.args.device)
        self.yaml_path = yaml_path
        self.record: Record | None = None
        self.save_path: Path | None = None
        self.logger = logging.getLogger(LOGGER)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add FIRE's options (all default to None, so that the YAML config supplies what is not given)."""
        parser.add_argument("--yaml_path", help="YAML config (default: config/defense/fire/config.yaml under the root)")
        for name, option in _OPTIONS.items():
            parser.add_argument(f"--{name}", type=option.kind, help=option.help)

    def set_result(self, result_file: str | None) -> None:
        """Load ``record/<result_file>/`` under the root (safely), check its dataset, make the output folder."""
        if result_file is None:
            raise FireDefenseError("no record given; pass --result_file NAME (a folder under record/).")
        record_dir = self.root / "record" / result_file
        if not (record_dir / RECORD_FILE).is_file():
            raise FireDefenseError(
                f"no record {record_dir} (no {RECORD_FILE} there); --result_file names a folder under "
                f"{self.root / 'record'}."
            )
        record = load_record(record_dir, data_root=self.args.dataset_path)
        if self.args.dataset not in (None, record.dataset.name):
            raise FireDefenseError(
                f"--dataset is {self.args.dataset} but record {result_file} was made on {record.dataset.name}; "
                f"pass --dataset {record.dataset.name} (config.yaml fits any dataset)."
            )
        self.record, self.save_path = record, record_dir / "defense" / "fire"
        (self.save_path / "log").mkdir(parents=True, exist_ok=True)

    def set_logger(self) -> None:
        """Log to the console and to ``log/<time>.log`` in the output folder (replacing an earlier call's handlers)."""
        save_path = self._require_result()[1]
        for handler in list(self.logger.handlers):  # the logger is ours: every handler on it came from here
            self.logger.removeHandler(handler)
            handler.close()
        log_file = save_path / "log" / f"{time.strftime('%Y_%m_%d_%H_%M_%S')}.log"
        formatter = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%Y-%m-%d:%H:%M:%S")
        for handler in (logging.FileHandler(log_file), logging.StreamHandler()):
            handler.setFormatter(formatter)
            self.logger.addHandler(handler)
        self.logger.setLevel(logging.INFO)
        base = FireDefense.__bases__[0]
        self.logger.info("fire-defense %s; FireDefense derives from %s.%s", __version__, base.__module__, base.__name__)
        self.logger.info("config %s; options %s", self.yaml_path or "(fire-defense's default)", vars(self.args))

    def mitigation(self) -> dict[str, Any]:
        """Fit FIRE as the protocol says, score it and the undefended model on the evaluation part, write the outputs.

        Returns:
            ``model``: the repaired classifier (an ``nn.Module`` of ``[0, 1]`` images, the record's model behind
            the dataset's normalisation with FIRE's hooks); ``fire``: the fitted :class:`FIRE`; ``metrics``:
            ``test_acc``, ``test_asr``, ``test_ra`` on the evaluation part.
        """
        record, save_path = self._require_result()
        args = self.args
        clean_data = (
            {"clean_indices": self._clean_indices(args.index)}
            if args.index is not None
            else drop_none({"clean_ratio": args.ratio, "clean_size": args.clean_size})
        )
        split = split_record(record, seed=args.random_seed, defender_share=args.defender_share, **clean_data)
        self.logger.info("record %s (%s, %s); %s", record.path, record.model_name, record.dataset.name, describe(split))
        protocol = Protocol(
            len(split.clean_reference), args.k, args.defender_share, eval_clean=None, eval_poisoned=None
        )
        batch = drop_none({"batch_size": args.batch_size})
        layers = "auto" if args.layers == "auto" else [name.strip() for name in args.layers.split(",")]
        fire_spec = DefenseSpec("fire", {"mode": args.mode, "layers": layers, "fpr": args.fpr, **batch})
        evaluations = [
            evaluate(record, split, spec, protocol, self.device) for spec in (DefenseSpec("none", batch), fire_spec)
        ]
        before, after = with_der([evaluation.row for evaluation in evaluations])
        fire = evaluations[1].defense.fire_
        self.logger.info("FIRE (%s) at %s from %d poisoned inputs", args.mode, ", ".join(fire.layers_), args.k)
        for name, metrics in (("no defense", before), ("FIRE", after)):
            self.logger.info("%-10s %s", name, ", ".join(f"{m} {100 * metrics[m]:.2f}%" for m in METRICS))
        self.logger.info("DER %.4f (on the evaluation part)", after["der"])

        state = {k: v.detach().cpu().clone() for k, v in record.model.state_dict().items()}
        result = {"model_name": record.model_name, "num_classes": record.num_classes, "model": state}
        write_atomically(save_path / "defense_result.pt", lambda path: torch.save(result, path))
        write_atomically(save_path / "fire_state.pt", fire.save)
        summary = summary_csv([after], METRICS)
        write_atomically(save_path / "fire_df_summary.csv", lambda path: path.write_text(summary))
        self.logger.info("wrote defense_result.pt, fire_state.pt and fire_df_summary.csv to %s", save_path)
        return {"model": fire.module(), "fire": fire, "metrics": {m: after[m] for m in METRICS}}

    def defense(self, result_file: str | None) -> dict[str, Any]:
        """:meth:`set_result`, :meth:`set_logger`, then :meth:`mitigation`."""
        self.set_result(result_file)
        self.set_logger()
        return self.mitigation()

    def _require_result(self) -> tuple[Record, Path]:
        if self.record is None or self.save_path is None:
            raise FireDefenseError("no record loaded; call set_result(result_file) (or defense(result_file)) first.")
        return self.record, self.save_path

    @staticmethod
    def _clean_indices(path: str) -> np.ndarray:
        """BackdoorBench's ``--index`` file: whitespace-separated integers, as its ``choose_index`` reads it."""
        try:
            return np.loadtxt(path, dtype=np.int64, ndmin=1)
        except OSError as error:
            raise FireDefenseError(
                f"cannot read the index file {path} ({error.strerror or first_line(error)})."
            ) from None
        except ValueError as error:
            raise FireDefenseError(f"{path} is not a file of integer indices ({first_line(error)}).") from None


def main(argv: Sequence[str] | None = None, root: str | Path | None = None) -> int:
    """The body of BackdoorBench's ``defense/fire.py``: run FIRE on one record; 2 (one line) on bad input."""
    parser = argparse.ArgumentParser(
        prog="defense/fire.py", description="FIRE (fire-defense) on a BackdoorBench record"
    )
    FireDefense.add_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> None:
        defense = FireDefense(args, root=root)
        defense.defense(defense.args.result_file)

    return run_cli("defense/fire.py", run)

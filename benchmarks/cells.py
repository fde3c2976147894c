"""One cell of the benchmark: a defense on a record under one protocol seed, computed once and cached.

A cell's result is a JSON file named by a hash of everything it is computed from (the record's
bytes, the defense and its parameters, the protocol, the seed, the latency settings), written to
a temporary file and renamed into place: an interrupted run leaves no partial result, and a
finished cell is never computed again. Cells run in worker processes (``fire_bench.executors``);
everything a worker needs travels in the :class:`Cell`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_adapters import ImageSet, Record, load_record, to_tensor
from fire_bench.defenses import RuntimeDefense, create_defense
from fire_bench.grid import DefenseSpec, KCurve, Latency, Protocol
from fire_bench.protocol import Split, describe, split_record
from fire_bench.timing import interleaved_ratio, peak_memory_mb
from fire_defense import resolve_device
from fire_defense.metrics import REJECTED, auroc, backdoor_metrics

__all__ = ["CACHE_VERSION", "Cell", "KCurveCell", "cached_result", "record_fingerprint", "run_cell"]

CACHE_VERSION = 2  # bump when a change to the code changes what a cell computes


@functools.lru_cache(maxsize=64)
def record_fingerprint(record_dir: str) -> str:
    """SHA-256 of a record's ``attack_result.pt`` (the model and the poisoned set's index)."""
    digest = hashlib.sha256()
    with open(Path(record_dir) / "attack_result.pt", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Keyed:
    """A cell's cache key: a hash of :meth:`identity`."""

    prefix = ""

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        return self.prefix + digest[:24]


@dataclass(frozen=True)
class Cell(_Keyed):
    """A defense on a record under one seed (module docstring)."""

    record_dir: str
    defense: DefenseSpec
    protocol: Protocol
    seed: int
    latency: Latency
    data_root: str | None = None
    device: str = "auto"

    def identity(self) -> dict[str, Any]:
        """What the result depends on (not where files are or which device runs it)."""
        return {
            "version": CACHE_VERSION,
            "record": record_fingerprint(self.record_dir),
            "defense": asdict(self.defense),
            "protocol": asdict(self.protocol),
            "seed": self.seed,
            "latency": asdict(self.latency),
        }

    @property
    def cost(self) -> float:
        """Relative cost, to order the work and estimate the time left: passes per evaluated sample, plus two
        for the fixed work (loading, fitting, timing)."""
        return 2 + create_defense(self.defense.name, **self.defense.params).forward_passes


@dataclass(frozen=True)
class KCurveCell(_Keyed):
    """FIRE's streaming k-curve on one record under one seed."""

    prefix = "kcurve-"

    record_dir: str
    curve: KCurve
    protocol: Protocol
    seed: int
    data_root: str | None = None
    device: str = "auto"

    def identity(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "record": record_fingerprint(self.record_dir),
            "k_curve": asdict(self.curve),
            "protocol": asdict(self.protocol),
            "seed": self.seed,
        }

    @property
    def cost(self) -> float:
        """Relative cost (as :attr:`Cell.cost`): FIRE's update and one evaluation pass for each ``k``."""
        return 2 * len(self.curve.ks) + 2


def cached_result(cell: Cell | KCurveCell, cache_dir: Path) -> dict[str, Any] | None:
    """The cell's stored result, if it was finished before."""
    path = Path(cache_dir) / f"{cell.key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_atomically(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(result, out, indent=1)
    os.replace(temporary, path)


@functools.lru_cache(maxsize=2)
def _load(record_dir: str, data_root: str | None) -> Record:
    return load_record(record_dir, data_root)


def _subsample(images: ImageSet, size: int | None, seed: int) -> ImageSet:
    if size is None or size >= len(images):
        return images
    return images.subset(np.sort(np.random.default_rng(seed).choice(len(images), size=size, replace=False)))


def _trigger(record: Record, device: torch.device):
    """The record's true trigger on ``[0, 1]`` tensors (records made by our factory carry its parameters)."""
    from fire_adapters.factory import load_attack
    from fire_adapters.preprocess import to_uint8

    attack = load_attack(record)
    return lambda x: to_tensor(attack(to_uint8(x)), x.device)


def _fitted(cell: Cell, record: Record, split: Split, device: torch.device) -> tuple[RuntimeDefense, float]:
    classifier = record.classifier().to(device)
    defense = create_defense(cell.defense.name, seed=cell.seed, **cell.defense.params)
    clean = to_tensor(split.clean_reference.images, device)
    poisoned = to_tensor(split.poisoned_inputs(cell.protocol.k).images, device) if "poisoned" in defense.needs else None
    trigger = _trigger(record, device) if "trigger" in defense.needs else None
    started = time.perf_counter()
    defense.fit(classifier, clean, poisoned=poisoned, trigger=trigger)
    return defense, time.perf_counter() - started


def _seconds(fn, batch: torch.Tensor) -> float:
    started = time.perf_counter()
    fn(batch)
    return time.perf_counter() - started


def _latency(defense: RuntimeDefense, reference: RuntimeDefense, inputs: torch.Tensor, latency: Latency) -> dict:
    """Seconds per sample and ratios to the undefended model, interleaved in this run, at each batch size."""
    out = {}
    for size in latency.batch_sizes:
        batch = inputs[:size]
        once = {
            name: _seconds(fn, batch) for name, fn in (("variant", defense.predict), ("baseline", reference.predict))
        }
        repeat = max(1, int(0.02 / max(once["baseline"], 1e-6)))  # >= ~20 ms per timing
        rounds = min(latency.rounds, max(1, int(latency.max_seconds / (repeat * once["variant"]))))
        timings: dict[str, list[float]] = {"variant": [], "baseline": []}
        ratio = interleaved_ratio(
            functools.partial(defense.predict, batch),
            functools.partial(reference.predict, batch),
            rounds,
            repeat,
            timings,
        )
        out[f"latency_b{size}_ms"] = 1000 * float(np.median(timings["variant"])) / (repeat * len(batch))
        out[f"latency_b{size}_ratio"] = ratio
        out[f"latency_b{size}_rounds"] = rounds
    return out


def run_cell(cell: Cell | KCurveCell, cache_dir: str | Path) -> dict[str, Any]:
    """The cell's result: from the cache, or computed now and written atomically to it."""
    cache_dir = Path(cache_dir)
    found = cached_result(cell, cache_dir)
    if found is not None:
        return found
    device = resolve_device(cell.device)
    record = _load(cell.record_dir, cell.data_root)
    split = split_record(
        record, seed=cell.seed, clean_size=cell.protocol.clean_size, defender_share=cell.protocol.defender_share
    )
    split = replace(  # the evaluation part, capped by a seeded subsample
        split,
        clean_eval=_subsample(split.clean_eval, cell.protocol.eval_clean, cell.seed),
        poisoned_eval=_subsample(split.poisoned_eval, cell.protocol.eval_poisoned, cell.seed + 1),
    )
    result = {
        "key": cell.key,
        "record": Path(cell.record_dir).name,
        "dataset": record.dataset.name,
        "backbone": record.model_name,
        "attack_name": str(record.metadata.get("attack", Path(cell.record_dir).name)),
        "ratio": record.metadata.get("pratio", record.metadata.get("attack_params", {}).get("ratio", "")),
        "seed": cell.seed,
    }
    if isinstance(cell, KCurveCell):
        from fire_bench.fire_report import streaming_curve

        classifier = record.classifier().to(device)
        result["curve"] = streaming_curve(classifier, split, cell.curve.ks, cell.curve.mode, device=device)
    else:
        result.update(_evaluate(cell, record, split, device))
    _write_atomically(cache_dir / f"{cell.key}.json", result)
    return result


def _evaluate(cell: Cell, record: Record, split: Split, device: torch.device) -> dict[str, Any]:
    clean, poisoned = split.clean_eval, split.poisoned_eval
    defense, fit_seconds = _fitted(cell, record, split, device)
    clean_x, poisoned_x = to_tensor(clean.images), to_tensor(poisoned.images)
    on_clean, on_poisoned = defense.decide(clean_x), defense.decide(poisoned_x)
    metrics = backdoor_metrics(
        on_clean.labels.numpy(), clean.labels, on_poisoned.labels.numpy(), poisoned.labels, poisoned.targets
    )
    out: dict[str, Any] = {
        "defense_name": cell.defense.label,
        "defense": cell.defense.name,
        "params": cell.defense.params,
        **metrics,
        "rejects": defense.rejects,
        "forward_passes": defense.forward_passes,
        "fit_s": fit_seconds,
        "split": describe(split),
    }
    if defense.rejects:
        out["tpr"] = float(np.mean(on_poisoned.labels.numpy() == REJECTED))
        out["fpr"] = float(np.mean(on_clean.labels.numpy() == REJECTED))
    if on_clean.scores is not None and on_poisoned.scores is not None:
        out["auroc"] = auroc(on_clean.scores.numpy(), on_poisoned.scores.numpy())
    reference = create_defense("none").fit(defense.model_, to_tensor(split.clean_reference.images[:1], device))
    out.update(_latency(defense, reference, clean_x, cell.latency))
    out["peak_mem_mb"] = peak_memory_mb(lambda: defense.predict(clean_x[: max(cell.latency.batch_sizes)]), device)
    return out

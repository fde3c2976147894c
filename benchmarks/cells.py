"""Cells of the benchmark, computed once and cached: a defense on a record under one protocol seed, and its latency.

A :class:`Cell`'s result is the row :func:`fire_bench.evaluation.evaluate` returns; a
:class:`LatencyCell`'s is the defense's cost (latency per sample and its ratio to the undefended
model at each batch size, peak memory, fitting time), measured after every cell, one at a time.
Each result is a JSON file named by a hash of everything it is computed from (the record's
content and its poisoned images, the clean dataset's files it reads, the defense and its
parameters, the protocol, the seed, the latency settings, a code version), written atomically: an
interrupted run leaves no partial result, and a finished one is never computed again. A cache file
that is not a whole result (truncated, empty, another cell's) is named, moved aside to
``<name>.corrupt`` and computed again. Cells run in worker processes (``fire_bench.executors``);
everything a worker needs travels in the :class:`Cell`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fire_adapters import Record, load_record, to_tensor
from fire_adapters.datasets import find_dataset, get_dataset_spec
from fire_adapters.records import backdoorbench_data_dir, read_record_file
from fire_bench.atomic import write_json_atomically
from fire_bench.defenses import RuntimeDefense, create_defense
from fire_bench.evaluation import defender, evaluate, protocol_split
from fire_bench.grid import DefenseSpec, Latency, Protocol
from fire_bench.protocol import Split
from fire_bench.timing import interleaved_ratio, peak_memory_mb, synchronized
from fire_defense import FireDefenseError, resolve_device

__all__ = [
    "CACHE_VERSION",
    "TIMING_KEYS",
    "Cell",
    "LatencyCell",
    "cached_result",
    "data_fingerprint",
    "folder_digest",
    "record_fingerprint",
    "run_cell",
    "run_latency",
]

CACHE_VERSION = 6  # bump when a change to the code changes what a cell computes

TIMING_KEYS = frozenset({"train_seconds"})
"""Keys of ``attack_result.pt`` that say how long the record took to make, not what it is: not fingerprinted."""


def _feed(digest: Any, value: Any) -> None:
    """Hash ``value`` (nested mappings, sequences, tensors, arrays, scalars) canonically into ``digest``."""
    if isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=lambda k: repr(_scalar(k))):
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {value.dtype} {tuple(value.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        digest.update(f"array {value.dtype.str} {value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    else:
        digest.update(repr(_scalar(value)).encode() + b";")


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


@functools.lru_cache(maxsize=64)
def record_fingerprint(record_dir: str) -> str:
    """SHA-256 of what a cell reads from a record: the content of ``attack_result.pt`` (the model's tensors, the
    poisoned sets' indices and labels, the attack's parameters; not :data:`TIMING_KEYS`), read with the safe
    loader, and every PNG in the record's folder (the poisoned images), by path and bytes."""
    folder, content = read_record_file(record_dir)
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in content.items() if k not in TIMING_KEYS})
    for png in sorted(folder.rglob("*.png")):
        digest.update(png.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(png.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _files_digest(folder: str, listing: tuple[tuple[str, int, int], ...]) -> str:
    """SHA-256 of the files ``listing`` names in ``folder`` (relative path, size, bytes); once per listing."""
    digest = hashlib.sha256()
    for relative, size, _ in listing:
        digest.update(f"{relative}\0{size}\0".encode())
        with open(Path(folder) / relative, "rb") as handle:
            for block in iter(functools.partial(handle.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str:
    """SHA-256 of every file under ``folder`` (hidden names skipped), by relative path, size and bytes.

    The bytes are read once per process for each listing of paths, sizes and modification times; a file
    rewritten since is read again.
    """
    folder = Path(folder).resolve()
    listing = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            stat = path.stat()
            listing.append((relative.as_posix(), stat.st_size, stat.st_mtime_ns))
    return _files_digest(str(folder), tuple(listing))


def data_fingerprint(record_dir: str, data_root: str | None = None) -> str:
    """SHA-256 of the clean dataset a cell on ``record_dir`` reads: the folder ``load_record(record_dir,
    data_root)`` would take it from (found as it does), every file in it (:func:`folder_digest`).

    Raises:
        DatasetNotFoundError: the record's dataset is nowhere on this machine (before any cell runs).
    """
    return folder_digest(_data_folder(record_dir, data_root))


@functools.lru_cache(maxsize=64)
def _data_folder(record_dir: str, data_root: str | None) -> Path:
    """Where ``load_record(record_dir, data_root)`` finds the record's clean dataset (looked up once per process)."""
    folder, content = read_record_file(record_dir)
    spec = get_dataset_spec(str(content.get("clean_data")))
    bb_data = backdoorbench_data_dir(folder, str(content.get("data_path", "")))
    return find_dataset(spec, root=data_root, backdoorbench_data=bb_data)[0]


class _Keyed:
    """A cached result's key: a hash of :meth:`identity`, computed once (and sent along to a worker)."""

    prefix = ""

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    @functools.cached_property
    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()
        return self.prefix + digest[:24]


@dataclass(frozen=True)
class Cell(_Keyed):
    """A defense on a record under one seed (module docstring); ``table``: the output it belongs to
    (``'leaderboard'``, or ``'k_curve'`` for a point of FIRE's streaming curve)."""

    record_dir: str
    defense: DefenseSpec
    protocol: Protocol
    seed: int
    data_root: str | None = None
    device: str = "auto"
    table: str = "leaderboard"

    @functools.cached_property
    def inputs(self) -> tuple[str, str]:
        """The fingerprints of what the cell reads: the record (:func:`record_fingerprint`) and its clean data
        (:func:`data_fingerprint`)."""
        return record_fingerprint(self.record_dir), data_fingerprint(self.record_dir, self.data_root)

    def identity(self) -> dict[str, Any]:
        """What the result depends on (not where files are or which device runs it)."""
        record, data = self.inputs
        return {
            "version": CACHE_VERSION,
            "record": record,
            "data": data,
            "defense": asdict(self.defense),
            "protocol": asdict(self.protocol),
            "seed": self.seed,
            "table": self.table,
        }

    @functools.cached_property
    def cost(self) -> float:
        """Relative cost, to order the work and estimate the time left: passes per evaluated sample, plus two
        for the fixed work (loading, fitting)."""
        return 2 + create_defense(self.defense.name, **self.defense.params).forward_passes


@dataclass(frozen=True)
class LatencyCell(_Keyed):
    """The cost of a :class:`Cell`'s defense, measured under ``latency``'s settings (module docstring)."""

    prefix = "latency-"

    cell: Cell
    latency: Latency

    def identity(self) -> dict[str, Any]:
        return {**self.cell.identity(), "latency": asdict(self.latency)}


def cached_result(cell: _Keyed, cache_dir: str | Path) -> dict[str, Any] | None:
    """The cell's stored result, if it was finished before.

    A file that is not a whole result of this cell is moved aside (``<name>.corrupt``, said in one line) and
    ``None`` returned, so the cell is computed again.

    Raises:
        FireDefenseError: the file cannot be read (permissions).
    """
    path = Path(cache_dir) / f"{cell.key}.json"
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        text = b""
    except OSError as error:
        raise FireDefenseError(
            f"cannot read the cached result {path} ({error.strerror}); fix its permissions or delete it."
        ) from None
    try:
        result = json.loads(text)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "empty" if not text.strip() else f"not JSON: {str(error).splitlines()[0]}"
    else:
        if isinstance(result, dict) and result.get("key") == cell.key:
            return result
        why = "not this cell's result"
    corrupt = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, corrupt)
    except FileNotFoundError:
        pass  # another process set it aside first
    tqdm.write(f"cache: {path} is {why}; moved it to {corrupt.name}, computing the cell again.")
    return None


@functools.lru_cache(maxsize=2)
def _load(record_dir: str, data_root: str | None, inputs: tuple[str, str]) -> Record:
    """The record, loaded once per process for each content of its files (``inputs``: :attr:`Cell.inputs`)."""
    return load_record(record_dir, data_root)


@functools.lru_cache(maxsize=4)
def _split(
    record_dir: str, data_root: str | None, inputs: tuple[str, str], clean_size: int, defender_share: float, seed: int
) -> Split:
    """The protocol's split of a record (the same for every defense and ``k``: a worker makes it once)."""
    record = _load(record_dir, data_root, inputs)
    return protocol_split(record, Protocol(clean_size=clean_size, defender_share=defender_share), seed)


def _record_and_split(cell: Cell) -> tuple[Record, Split]:
    protocol, where = cell.protocol, (cell.record_dir, cell.data_root, cell.inputs)
    split = _split(*where, protocol.clean_size, protocol.defender_share, cell.seed)
    return _load(*where), split


def run_cell(cell: Cell, cache_dir: str | Path) -> dict[str, Any]:
    """The cell's row: from the cache, or computed now (:func:`fire_bench.evaluation.evaluate`) and cached."""
    found = cached_result(cell, cache_dir)
    if found is not None:
        return found
    record, split = _record_and_split(cell)
    row = evaluate(record, split, cell.defense, cell.protocol, resolve_device(cell.device)).row
    result = {"key": cell.key, "table": cell.table, **row}
    write_json_atomically(Path(cache_dir) / f"{cell.key}.json", result)
    return result


def _seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _latency(
    defense: RuntimeDefense, reference: RuntimeDefense, inputs: torch.Tensor, latency: Latency, device: torch.device
) -> dict[str, Any]:
    """Per-sample milliseconds and the median ratio to the undefended model, interleaved, at each batch size.

    A first call of each warms it up and sizes the rounds; on the largest batch it also gives the peak memory.
    Where one round of the defense would already exceed ``max_seconds``, that first call is the measurement.
    """
    out: dict[str, Any] = {}
    for size in latency.batch_sizes:
        batch = inputs[:size]
        variant = synchronized(functools.partial(defense.predict, batch), device)
        baseline = synchronized(functools.partial(reference.predict, batch), device)
        if size == max(latency.batch_sizes):  # the first call on the largest batch also gives the peak memory
            seconds: list[float] = []
            out["peak_mem_mb"] = peak_memory_mb(lambda v=variant, s=seconds: s.append(_seconds(v)), device)
            first = seconds[0]
        else:
            first = _seconds(variant)
        first_baseline = _seconds(baseline)
        repeat = max(1, int(np.ceil(latency.min_seconds / max(first_baseline, 1e-6))))
        rounds = min(latency.rounds, int(latency.max_seconds / (repeat * first)))
        timings: dict[str, list[float]] = {}
        if rounds:
            ratio = interleaved_ratio(variant, baseline, rounds, repeat, timings, latency.min_rounds, latency.precision)
        else:
            timings["variant"], ratio, repeat = [first], first / first_baseline, 1
        out[f"latency_b{size}_ratio"] = ratio
        out[f"latency_b{size}_ms"] = 1000 * float(np.median(timings["variant"])) / (repeat * len(batch))
        out[f"latency_b{size}_rounds"] = len(timings["variant"])
    return out


def run_latency(job: LatencyCell, cache_dir: str | Path) -> dict[str, Any]:
    """The defense's cost: from the cache, or measured now in this process (with ``job.latency.threads``
    PyTorch threads) and cached. Run one at a time, with nothing else busy on the machine."""
    found = cached_result(job, cache_dir)
    if found is not None:
        return found
    cell, threads = job.cell, torch.get_num_threads()
    device = resolve_device(cell.device)
    record, split = _record_and_split(cell)
    defense = create_defense(cell.defense.name, seed=cell.seed, **cell.defense.params)
    data = defender(record, split, defense, cell.protocol, device)
    torch.set_num_threads(job.latency.threads)
    try:
        fit_seconds = _seconds(synchronized(lambda: data.fit(defense), device))
        with torch.inference_mode():
            batches = data.inputs.split(defense.batch_size)
            forward_seconds = _seconds(synchronized(lambda: [data.classifier(b) for b in batches], device))
        reference = create_defense("none").fit(data.classifier, data.clean[:1])
        inputs = to_tensor(split.clean_eval.images[: max(job.latency.batch_sizes)])
        result = {
            "key": job.key,
            "cell": cell.key,
            "record": Path(cell.record_dir).name,
            "dataset": record.dataset.name,
            "backbone": record.model_name,
            "defense_name": cell.defense.label,
            "defense": cell.defense.name,
            "fit_s": fit_seconds,
            "fit_inputs": len(data.inputs),
            "fit_forward_s": forward_seconds,
            **_latency(defense, reference, inputs, job.latency, device),
            "threads": job.latency.threads,
        }
    finally:
        torch.set_num_threads(threads)
    write_json_atomically(Path(cache_dir) / f"{job.key}.json", result)
    return result

"""BackdoorBench attack records: load them safely, and write ones BackdoorBench can load.

A record is a folder ``record/<name>/`` holding ``attack_result.pt`` (a dict with
``model_name``, ``num_classes``, ``model`` (a state dict), ``data_path``,
``img_size``, ``clean_data``, ``bd_train``, ``bd_test``) and the poisoned images
as PNG files, ``bd_test_dataset/<label>/<idx>.png`` (and ``bd_train_dataset/...``).
Only poisoned samples are stored; clean ones come from the raw dataset.

Paths inside a record are relative to BackdoorBench's root (``./record/<name>/...``,
``./data/<dataset>``). We resolve a PNG path against the record folder itself (the
part after ``record/<name>/``), so a record loads from any current directory and
after being moved or renamed, and never reads outside its folder.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from fire_adapters.datasets import DatasetSpec, find_dataset, get_dataset_spec, load_dataset, read_image
from fire_adapters.images import ImageSet
from fire_adapters.models import MODELS, TIMM_PREFIX, create_model, load_model_state
from fire_adapters.preprocess import with_normalization
from fire_adapters.safe_load import safe_torch_load
from fire_defense import FireDefenseError
from fire_defense.checks import is_integer
from fire_defense.progress import progress_bar

__all__ = [
    "RECORD_FILE",
    "Record",
    "RecordError",
    "backdoorbench_data_dir",
    "load_record",
    "read_record_file",
    "save_record",
]

RECORD_FILE = "attack_result.pt"
_DAMAGED = "the record is damaged: copy it again or rebuild it"
REQUIRED_KEYS = ("model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test")


class RecordError(FireDefenseError):
    """A record folder is missing, incomplete, or inconsistent with its dataset."""


@dataclass
class Record:
    """A loaded BackdoorBench attack record.

    Attributes:
        path: The record folder.
        model_name: Zoo name of the model (see :func:`fire_adapters.create_model`).
        num_classes: Output classes of the model.
        dataset: Spec of the clean dataset.
        model: The backdoored network with the record's weights, on the CPU, in eval mode.
            It takes normalised inputs, as in BackdoorBench; :meth:`classifier` takes ``[0, 1]`` images.
        clean_test: The whole clean test split.
        poisoned_test: Poisoned test images; ``labels`` are the true labels, ``targets`` the
            attacker's, ``indices`` positions in the clean test split.
        train_poison_indices: Positions in the clean training split that were poisoned (``None`` if not recorded).
        data_dir: Where the clean data was found.
        metadata: Every other key of ``attack_result.pt`` (attack name and parameters, ...).
    """

    path: Path
    model_name: str
    num_classes: int
    dataset: DatasetSpec
    model: nn.Module
    clean_test: ImageSet
    poisoned_test: ImageSet
    train_poison_indices: np.ndarray | None
    data_dir: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    def classifier(self) -> nn.Sequential:
        """The model behind the dataset's normalisation: it takes ``(N, C, H, W)`` images in ``[0, 1]``.

        It wraps :attr:`model` itself, so moving the classifier to a device moves the model too.
        """
        return with_normalization(self.model, self.dataset).eval()

    def load_clean_train(self) -> ImageSet:
        """The clean training split, from the same folder as :attr:`clean_test`."""
        return load_dataset(self.dataset, "train", root=self.data_dir)


def backdoorbench_data_dir(record_dir: Path, data_path: str) -> Path | None:
    """BackdoorBench's data folder for a record at ``<root>/record/<name>``, else ``None``."""
    record_dir = record_dir.resolve()
    if record_dir.parent.name != "record":
        return None
    parts = PurePosixPath(str(data_path).replace("\\", "/")).parts
    if "data" not in parts:
        return None
    return record_dir.parent.parent.joinpath(*parts[parts.index("data") :])


def _resolve_in_record(stored: str, record_dir: Path) -> Path:
    """A path stored in a record, re-rooted at the record folder; it may not leave that folder."""
    parts = PurePosixPath(str(stored).replace("\\", "/")).parts
    if "record" in parts and len(parts) > parts.index("record") + 2:
        parts = parts[parts.index("record") + 2 :]
    elif PurePosixPath(*parts).is_absolute():
        parts = parts[1:]
    resolved = record_dir.joinpath(*parts).resolve()
    if not resolved.is_relative_to(record_dir.resolve()):
        raise RecordError(
            f"{record_dir / RECORD_FILE} names a file outside its folder ({stored}); refusing to read it."
        )
    return resolved


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, numpy or 0-d integer tensor), else ``None``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    return int(value) if is_integer(value) else None


def _integer_array(value: Any) -> np.ndarray | None:
    """``value`` as a flat int64 array if it holds integers (or integral floats, like BackdoorBench's indicator)."""
    try:
        array = np.asarray(value).reshape(-1)
    except (TypeError, ValueError):
        return None
    if array.dtype.kind in "biu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.isfinite(array).all() and (array == np.round(array)).all():
        return array.astype(np.int64)
    return None


def _poison_indicator(value: Any, where: str) -> np.ndarray:
    """A dataset state's ``poison_indicator`` as an int64 array of 0s and 1s, else a :class:`RecordError`."""
    indicator = _integer_array(value)
    if indicator is None or not np.isin(indicator, (0, 1)).all():
        raise RecordError(f"{where}: poison_indicator must be an array of 0s and 1s; {_DAMAGED}.")
    return indicator


def _read_png(path: Path, spec: DatasetSpec) -> np.ndarray:
    height, width, _ = spec.img_size
    mismatch = f"{spec.name} images are {height}x{width}; the record was made on another dataset or image size"
    fix = "copy the record's whole folder again"
    array = np.asarray(read_image(path, "poisoned image", fix, RecordError, size=(width, height), size_fix=mismatch))
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != spec.img_size or array.dtype != np.uint8:
        raise RecordError(
            f"poisoned image {path} is {'x'.join(map(str, array.shape))} {array.dtype} but {spec.name} images are "
            f"{'x'.join(map(str, spec.img_size))} uint8; the record was made on another dataset or image size."
        )
    return array


def _read_poisoned_split(
    state: Any, split: str, record_dir: Path, spec: DatasetSpec, clean: ImageSet, num_classes: int
) -> ImageSet:
    """The poisoned samples a ``bd_test``/``bd_train`` state describes, read from their PNG files."""
    where = f"{record_dir / RECORD_FILE} ({split})"
    try:
        stored = state["bd_data_container"]["data_dict"]
        entries = {_integer(k): v for k, v in stored.items()}
        raw_indicator = state["poison_indicator"]
        listed = _integer_array(state["original_index_array"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RecordError(
            f"{where} is not a BackdoorBench dataset state (bd_data_container.data_dict, poison_indicator, "
            "original_index_array)."
        ) from None
    if None in entries:
        raise RecordError(f"{where}: data_dict keys must be integer sample indices; {_DAMAGED}.")
    indicator = _poison_indicator(raw_indicator, where)
    if listed is None:
        raise RecordError(f"{where}: original_index_array must be an array of integer sample indices; {_DAMAGED}.")
    if len(indicator) != len(clean):
        raise RecordError(
            f"{where} covers {len(indicator)} samples but the {spec.name} {split} split found has {len(clean)}; "
            "the record was made on another copy or subset of the dataset."
        )
    if len(listed) and (listed.min() < 0 or listed.max() >= len(clean)):
        raise RecordError(f"{where} lists sample indices outside the {len(clean)}-sample {spec.name} {split} split.")
    indices = listed[indicator[listed] == 1]
    absent = [int(i) for i in indices if int(i) not in entries]
    if absent:
        raise RecordError(f"{where} marks samples {absent[:5]} as poisoned but stores no image for them.")
    images = np.empty((len(indices), *spec.img_size), dtype=np.uint8)
    labels = np.empty(len(indices), dtype=np.int64)
    targets = np.empty(len(indices), dtype=np.int64)
    for i, index in enumerate(progress_bar(indices, desc=f"{split} PNGs", unit="img", leave=False, min_total=2000)):
        entry = entries[int(index)]
        try:
            path, info = entry["path"], list(entry["other_info"][:2])
        except (KeyError, TypeError, ValueError, IndexError):
            raise RecordError(f"{where} entry {int(index)} lacks a path or [bd_label, label] other_info.") from None
        target, label = (_integer(v) for v in info) if len(info) == 2 else (None, None)
        if target is None or label is None or not isinstance(path, str) or "\0" in path:
            raise RecordError(
                f"{where} entry {int(index)} needs a path string and other_info [bd_label, label] as integers "
                f"(got path {type(path).__name__}, other_info {info!r:.60}); {_DAMAGED}."
            )
        if not 0 <= target < num_classes:
            raise RecordError(
                f"{where} entry {int(index)} has target label {target}, outside the model's {num_classes} classes; "
                f"{_DAMAGED}."
            )
        images[i] = _read_png(_resolve_in_record(path, record_dir), spec)
        targets[i], labels[i] = target, label
    disagree = np.flatnonzero(labels != clean.labels[indices])
    if len(disagree):
        raise RecordError(
            f"{where}: {len(disagree)} poisoned samples have original labels that differ from the {spec.name} "
            f"{split} split (first at index {indices[disagree[0]]}); the dataset copy is not the one the record used."
        )
    return ImageSet(images, labels, indices, targets)


def read_record_file(record_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The record folder and its ``attack_result.pt``, loaded safely and checked for BackdoorBench's keys.

    Raises:
        RecordError: no such file, or not a BackdoorBench attack result.
        UnsafeFileError: the file needs globals outside the allow-list; nothing was executed.
    """
    record_dir = Path(record_dir)
    if record_dir.name == RECORD_FILE:
        record_dir = record_dir.parent
    record_file = record_dir / RECORD_FILE
    if not record_file.is_file():
        raise RecordError(f"no {RECORD_FILE} in {record_dir}; pass the folder BackdoorBench wrote under record/.")
    raw = safe_torch_load(record_file)
    missing = [k for k in REQUIRED_KEYS if not isinstance(raw, Mapping) or k not in raw]
    if missing:
        raise RecordError(f"{record_file} is not a BackdoorBench attack result: it lacks {', '.join(missing)}.")
    return record_dir, dict(raw)


def load_record(record_dir: str | Path, data_root: str | Path | None = None, download: bool = False) -> Record:
    """Load a BackdoorBench attack record without executing anything in it.

    Args:
        record_dir: The record folder (or its ``attack_result.pt``).
        data_root: Where the clean dataset is; searched first (see :mod:`fire_adapters.datasets`),
            before BackdoorBench's ``data/`` next to ``record/``.
        download: Download the clean dataset if it is nowhere on disk.

    Raises:
        RecordError: the folder is not a complete record, or disagrees with its dataset.
        UnsafeFileError: ``attack_result.pt`` needs globals outside the allow-list; nothing was executed.
        UnknownNameError: the record names a model or dataset we do not know.
        DatasetNotFoundError: the clean dataset is not on this machine.
    """
    record_dir, raw = read_record_file(record_dir)
    record_file = record_dir / RECORD_FILE
    if not isinstance(raw["clean_data"], str) or not isinstance(raw["model_name"], str):
        raise RecordError(f"{record_file}: clean_data and model_name must be names (strings); the record is damaged.")
    spec = get_dataset_spec(raw["clean_data"])
    model_name, num_classes = raw["model_name"], _integer(raw["num_classes"])
    try:
        img_size = tuple(_integer(v) for v in raw["img_size"])
    except TypeError:
        img_size = (None,)
    if num_classes is None or None in img_size:
        raise RecordError(
            f"{record_file} has a malformed img_size or num_classes (img_size {raw['img_size']!r:.40}, "
            f"num_classes {raw['num_classes']!r:.40}); they must be integers: the record is damaged."
        )
    if img_size != spec.img_size:
        raise RecordError(
            f"{record_file} says img_size {list(img_size)} but {spec.name} is {list(spec.img_size)}; "
            "records of resized datasets are not supported."
        )
    if num_classes != spec.num_classes:
        raise RecordError(f"{record_file} says num_classes {num_classes} but {spec.name} has {spec.num_classes}.")
    weights = raw["model"]
    if isinstance(weights, Mapping):
        wrong = [str(k) for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if wrong:
            raise RecordError(
                f"the model in {record_file} holds non-tensor entries ({', '.join(wrong[:3])}) where a state dict "
                f"of tensors was expected; {_DAMAGED}."
            )
    model = create_model(model_name, num_classes)
    load_model_state(model, weights, source=f"the model in {record_file}")

    bb_data = backdoorbench_data_dir(record_dir, str(raw["data_path"]))
    data_dir, _ = find_dataset(spec, root=data_root, download=download, backdoorbench_data=bb_data)
    clean_test = load_dataset(spec, "test", root=data_dir)
    poisoned_test = _read_poisoned_split(raw["bd_test"], "test", record_dir, spec, clean_test, num_classes)
    bd_train = raw["bd_train"]
    train_poison = None
    if bd_train is not None and not isinstance(bd_train, Mapping):
        raise RecordError(f"{record_file}: bd_train must be a dataset state or None; the record is damaged.")
    if bd_train is not None and "poison_indicator" in bd_train:
        indicator = _poison_indicator(bd_train["poison_indicator"], f"{record_file} (train)")
        train_poison = np.flatnonzero(indicator == 1).astype(np.int64)
    return Record(
        path=record_dir,
        model_name=model_name,
        num_classes=num_classes,
        dataset=spec,
        model=model.eval(),
        clean_test=clean_test,
        poisoned_test=poisoned_test,
        train_poison_indices=train_poison,
        data_dir=data_dir,
        metadata={k: v for k, v in raw.items() if k not in REQUIRED_KEYS},
    )


def _write_poisoned_split(poisoned: ImageSet, split_size: int, folder: str, name: str, out: Path) -> dict[str, Any]:
    """Write PNGs under ``out/<folder>/<label>/<idx>.png``; return the BackdoorBench state describing them."""
    if poisoned.targets is None:
        raise FireDefenseError(f"the poisoned {folder} set needs targets (the attacker's labels).")
    if len(poisoned) and (poisoned.indices.min() < 0 or poisoned.indices.max() >= split_size):
        raise FireDefenseError(f"poisoned {folder} indices must lie in [0, {split_size}).")
    if len(np.unique(poisoned.indices)) != len(poisoned):
        raise FireDefenseError(f"poisoned {folder} indices repeat; each sample may be poisoned once.")
    stored_folder = f"./record/{name}/{folder}"
    data_dict: dict[np.int64, dict[str, Any]] = {}
    for image, label, index, target in zip(
        progress_bar(poisoned.images, desc=f"writing {folder}", unit="img", leave=False, min_total=2000),
        poisoned.labels,
        poisoned.indices,
        poisoned.targets,
        strict=True,
    ):
        (out / folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            out / folder / str(label) / f"{index}.png"
        )
        data_dict[np.int64(index)] = {
            "path": f"{stored_folder}/{label}/{index}.png",
            "other_info": [int(target), int(label)],
        }
    indicator = np.zeros(split_size, dtype=np.float64)
    indicator[poisoned.indices] = 1.0
    listed = np.sort(poisoned.indices) if folder.startswith("bd_test") else np.arange(split_size, dtype=np.int64)
    return {
        "bd_data_container": {"save_folder_path": stored_folder, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": listed.astype(np.int64),
        "poison_indicator": indicator,
        "save_folder_path": stored_folder,
    }


def _check_loadable(metadata: dict[str, Any]) -> None:
    """Refuse metadata that :func:`load_record` would refuse to load (anything beyond plain values and arrays)."""
    buffer = io.BytesIO()
    torch.save(metadata, buffer)
    buffer.seek(0)
    with tempfile.NamedTemporaryFile(suffix=".pt") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        try:
            safe_torch_load(handle.name)
        except FireDefenseError:
            kinds = sorted({type(v).__name__ for v in metadata.values()})
            raise FireDefenseError(
                f"metadata must hold only plain values, numpy arrays and tensors (got {', '.join(kinds)}): "
                "a record with anything else could not be loaded safely."
            ) from None


def save_record(
    record_dir: str | Path,
    *,
    model: nn.Module | Mapping[str, torch.Tensor],
    model_name: str,
    num_classes: int,
    dataset: str | DatasetSpec,
    poisoned_test: ImageSet,
    test_size: int,
    poisoned_train: ImageSet | None = None,
    train_size: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a record in BackdoorBench's layout, atomically (a crash leaves no half-written record).

    For BackdoorBench to load it, ``record_dir`` should be ``<BackdoorBench>/record/<name>``; we load it from anywhere.

    Args:
        record_dir: The folder to create.
        model: The backdoored network (or its state dict); saved on the CPU.
        model_name: Its zoo name; it must rebuild with :func:`fire_adapters.create_model`.
        num_classes: Output classes.
        dataset: The clean dataset's name or spec.
        poisoned_test: Poisoned test images with ``labels`` (true), ``targets`` and ``indices`` (positions
            in the test split).
        test_size: Length of the clean test split.
        poisoned_train: Poisoned training images likewise (their PNGs and state go in ``bd_train``), or ``None``.
        train_size: Length of the clean training split (needed with ``poisoned_train``).
        metadata: Extra keys for ``attack_result.pt`` (plain values, numpy arrays and tensors only).
        extra_files: Text files to write into the record folder with it (name -> content), e.g. summaries.
        overwrite: Replace an existing record.

    Returns:
        The record folder.
    """
    record_dir = Path(record_dir)
    spec = get_dataset_spec(dataset)
    if not model_name.startswith(TIMM_PREFIX) and model_name not in MODELS:
        raise FireDefenseError(f"model_name {model_name!r} is not a zoo name, so the record could not be loaded again.")
    clash = set(metadata or {}) & set(REQUIRED_KEYS)
    if clash:
        raise FireDefenseError(f"metadata may not override record keys {sorted(clash)}.")
    if _integer(num_classes) is None or num_classes != spec.num_classes:
        raise FireDefenseError(f"num_classes must be {spec.name}'s {spec.num_classes}, got {num_classes!r}.")
    for split, poisoned in (("test", poisoned_test), ("train", poisoned_train)):
        if poisoned is not None and poisoned.images.shape[1:] != spec.img_size:
            raise FireDefenseError(
                f"poisoned {split} images are {poisoned.images.shape[1:]} but {spec.name} images are {spec.img_size}."
            )
        for name in ("labels", "targets"):
            values = None if poisoned is None else getattr(poisoned, name)
            if values is not None and len(values) and (values.min() < 0 or values.max() >= num_classes):
                raise FireDefenseError(
                    f"poisoned {split} {name} span {values.min()}..{values.max()}, outside the {num_classes} classes."
                )
    if poisoned_train is not None and train_size is None:
        raise FireDefenseError("save_record needs train_size with poisoned_train.")
    if record_dir.exists() and not overwrite:
        raise FireDefenseError(f"{record_dir} exists; pass overwrite=True (or --overwrite) to replace it.")
    _check_loadable(dict(metadata or {}))

    state = model.state_dict() if isinstance(model, nn.Module) else model
    record_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{record_dir.name}.partial-", dir=record_dir.parent))
    try:
        content = {
            "model_name": model_name,
            "num_classes": int(num_classes),
            "model": {k: v.detach().cpu().clone() for k, v in state.items()},
            "data_path": f"./data/{spec.name}",
            "img_size": list(spec.img_size),
            "clean_data": spec.name,
            "bd_train": None
            if poisoned_train is None
            else _write_poisoned_split(poisoned_train, int(train_size), "bd_train_dataset", record_dir.name, staging),
            "bd_test": _write_poisoned_split(
                poisoned_test, int(test_size), "bd_test_dataset", record_dir.name, staging
            ),
            **dict(metadata or {}),
        }
        torch.save(content, staging / RECORD_FILE)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp made it private; a record is shared like any folder
        if record_dir.exists():
            shutil.rmtree(record_dir)
        os.replace(staging, record_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record_dir

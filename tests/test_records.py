"""BackdoorBench records: round trip, BackdoorBench's own format and layout, and every bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fire_adapters import (
    RECORD_FILE,
    ImageSet,
    RecordError,
    UnsafeFileError,
    create_model,
    load_dataset,
    load_record,
    safe_torch_load,
    save_record,
    to_tensor,
)
from fire_defense import FireDefenseError, UnknownNameError

from helpers import interrupt_image_writes, write_idx_dataset

TARGET = 0


def badnet(images: np.ndarray) -> np.ndarray:
    """A white 3x3 patch at the bottom-right corner (enough of an attack to make a record)."""
    out = images.copy()
    out[:, -3:, -3:, :] = 255
    return out


def poison(split: ImageSet, positions: np.ndarray) -> ImageSet:
    chosen = split.subset(positions)
    return ImageSet(badnet(chosen.images), chosen.labels, chosen.indices, np.full(len(chosen), TARGET))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A BackdoorBench-like root: data/fashionmnist (small, synthetic) and record/badnet_demo (ours)."""
    root = tmp_path_factory.mktemp("backdoorbench")
    write_idx_dataset(root / "data" / "fashionmnist", n_train=60, n_test=40, seed=11)
    test = load_dataset("fashionmnist", "test", root=root / "data")
    train = load_dataset("fashionmnist", "train", root=root / "data")
    model = create_model("preactresnet18", 10)
    save_record(
        root / "record" / "badnet_demo",
        model=model,
        model_name="preactresnet18",
        num_classes=10,
        dataset="fashionmnist",
        poisoned_test=poison(test, np.flatnonzero(test.labels != TARGET)),
        test_size=len(test),
        poisoned_train=poison(train, np.arange(0, 60, 10)),
        train_size=len(train),
        metadata={"attack": "badnet", "attack_params": {"patch": 3, "target": TARGET}},
    )
    return {"root": root, "record": root / "record" / "badnet_demo", "model": model, "test": test}


@pytest.fixture
def record_copy(bench, tmp_path):
    """A private copy of the record inside its own BackdoorBench-like root, safe to damage."""
    root = tmp_path / "bb"
    shutil.copytree(bench["root"], root)
    return root / "record" / "badnet_demo"


def _rewrite(record_dir: Path, **changes) -> None:
    content = safe_torch_load(record_dir / RECORD_FILE)
    content.update(changes)
    torch.save(content, record_dir / RECORD_FILE)


def test_round_trip_gives_identical_tensors_and_labels(bench):
    record = load_record(bench["record"])
    for key, value in bench["model"].state_dict().items():
        assert torch.equal(record.model.state_dict()[key], value), key
    test = bench["test"]
    expected = poison(test, np.flatnonzero(test.labels != TARGET))
    for field in ("images", "labels", "indices", "targets"):
        np.testing.assert_array_equal(getattr(record.poisoned_test, field), getattr(expected, field))
    np.testing.assert_array_equal(record.clean_test.images, test.images)
    np.testing.assert_array_equal(record.train_poison_indices, np.arange(0, 60, 10))
    assert record.metadata == {"attack": "badnet", "attack_params": {"patch": 3, "target": TARGET}}
    assert (record.model_name, record.num_classes, record.dataset.name) == ("preactresnet18", 10, "fashionmnist")
    assert record.data_dir == bench["root"] / "data" / "fashionmnist"
    assert not record.model.training
    assert len(record.load_clean_train()) == 60


def test_record_has_backdoorbench_format(bench):
    content = safe_torch_load(bench["record"] / RECORD_FILE)
    assert {"model_name", "num_classes", "model", "data_path", "img_size", "clean_data", "bd_train", "bd_test"} <= set(
        content
    )
    assert (content["data_path"], content["img_size"], content["clean_data"]) == (
        "./data/fashionmnist",
        [28, 28, 1],
        "fashionmnist",
    )
    state = content["bd_test"]
    data_dict = state["bd_data_container"]["data_dict"]
    assert all(type(k) is np.int64 for k in data_dict)
    index = int(state["original_index_array"][0])
    label = int(bench["test"].labels[index])
    assert data_dict[np.int64(index)] == {
        "path": f"./record/badnet_demo/bd_test_dataset/{label}/{index}.png",
        "other_info": [TARGET, label],
    }
    assert state["poison_indicator"].dtype == np.float64 and len(state["poison_indicator"]) == 40
    assert state["original_index_array"].dtype == np.int64
    png = bench["record"] / "bd_test_dataset" / str(label) / f"{index}.png"
    assert Image.open(png).mode == "L"
    train_state = content["bd_train"]
    assert len(train_state["original_index_array"]) == 60 and train_state["poison_indicator"].sum() == 6


def test_record_loads_from_any_working_directory(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_record(bench["record"] / RECORD_FILE).poisoned_test) == int((bench["test"].labels != TARGET).sum())


def test_moved_record_loads_with_a_data_root(bench, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(bench["record"], moved)
    record = load_record(moved, data_root=bench["root"] / "data")
    np.testing.assert_array_equal(
        record.poisoned_test.images[:3], load_record(bench["record"]).poisoned_test.images[:3]
    )


def test_a_record_as_backdoorbench_writes_it_loads(record_copy):
    """DataParallel keys, absolute PNG paths from another machine, numpy 1.x names, extra keys."""
    content = safe_torch_load(record_copy / RECORD_FILE)
    content["model"] = {f"module.{k}": v for k, v in content["model"].items()}
    for entry in content["bd_test"]["bd_data_container"]["data_dict"].values():
        entry["path"] = "/home/someone/BackdoorBench" + entry["path"][1:]
    content["noise_grid"] = torch.zeros(1, 4, 4, 2)
    torch.save(content, record_copy / RECORD_FILE)
    from test_safe_load import _rename_numpy_module

    _rename_numpy_module(record_copy / RECORD_FILE, b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    record = load_record(record_copy)
    assert len(record.poisoned_test) > 0 and "noise_grid" in record.metadata


def test_classifier_predicts_on_grey_poisoned_images(bench):
    record = load_record(bench["record"])
    with torch.inference_mode():
        logits = record.classifier()(to_tensor(record.poisoned_test.images))
    assert logits.shape == (len(record.poisoned_test), 10)


def _small_record(bench) -> dict:
    """save_record arguments for a record of three poisoned test images."""
    return {
        "model": bench["model"],
        "model_name": "preactresnet18",
        "num_classes": 10,
        "dataset": "fashionmnist",
        "poisoned_test": poison(bench["test"], np.arange(3)),
        "test_size": 40,
    }


def test_save_is_atomic_and_never_overwrites_silently(bench, tmp_path, monkeypatch):
    target = tmp_path / "record" / "crashed"
    kwargs = _small_record(bench)
    interrupt_image_writes(monkeypatch)  # while it writes the poisoned images
    with pytest.raises(KeyboardInterrupt):
        save_record(target, **kwargs)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half-written record, no leftovers
    monkeypatch.undo()
    save_record(target, **kwargs)
    with pytest.raises(FireDefenseError, match="exists; pass overwrite=True"):
        save_record(target, **kwargs)
    save_record(target, overwrite=True, **kwargs)


def test_save_rejects_what_could_not_be_loaded_again(bench, tmp_path):
    good = _small_record(bench)
    with pytest.raises(FireDefenseError, match="not a zoo name"):
        save_record(tmp_path / "a", **{**good, "model_name": "preactresnet18_w12"})
    with pytest.raises(FireDefenseError, match="needs targets"):
        save_record(tmp_path / "b", **{**good, "poisoned_test": bench["test"].subset([1, 2])})
    with pytest.raises(FireDefenseError, match=r"indices must lie in \[0, 2\)"):
        save_record(tmp_path / "c", **{**good, "test_size": 2})
    with pytest.raises(FireDefenseError, match="may not override"):
        save_record(tmp_path / "d", **{**good, "metadata": {"bd_test": 1}})
    assert not any(tmp_path.glob("[abcd]"))


# --- bad input: each gets its own clear message ---------------------------------------------------------------


def test_missing_record_folder(tmp_path):
    with pytest.raises(RecordError, match=f"no {RECORD_FILE} in .*nothing"):
        load_record(tmp_path / "nothing")


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"model_name": "preactresnet99"}, UnknownNameError, "unknown model 'preactresnet99'"),
        (
            {"model_name": "resnet18"},
            FireDefenseError,
            r"does not fit the model.*missing: bn1\.weight.*shape.*conv1\.weight.*check its model_name",
        ),
        ({"num_classes": 43}, RecordError, "num_classes 43 but fashionmnist has 10"),
        ({"img_size": [32, 32, 3]}, RecordError, r"img_size \[32, 32, 3\] but fashionmnist is \[28, 28, 1\]"),
    ],
    ids=["unknown-model", "another-model", "num-classes", "img-size"],
)
def test_a_field_that_disagrees_is_named(record_copy, change, error, message):
    _rewrite(record_copy, **change)
    with pytest.raises(error, match=message):
        load_record(record_copy)


def test_weights_with_another_num_classes(record_copy):
    content = safe_torch_load(record_copy / RECORD_FILE)
    content["model"]["linear.weight"] = content["model"]["linear.weight"][:5]
    torch.save(content, record_copy / RECORD_FILE)
    with pytest.raises(FireDefenseError, match=r"linear.weight \(5, 512\) vs \(10, 512\).*num_classes"):
        load_record(record_copy)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda png: png.unlink(), "{name} is missing"),
        (lambda png: png.write_bytes(b"\x89PNG garbage"), "{name} is corrupt"),
        (lambda png: Image.new("RGB", (32, 32)).save(png), "is 32x32 but fashionmnist images are 28x28"),
        (lambda png: Image.new("RGB", (28, 28)).save(png), "is 28x28x3 uint8 but fashionmnist images are 28x28x1"),
    ],
    ids=["missing", "corrupt", "another-size", "another-mode"],
)
def test_a_damaged_png_is_named(record_copy, damage, message):
    victim = next((record_copy / "bd_test_dataset").rglob("*.png"))
    damage(victim)
    with pytest.raises(RecordError, match=message.format(name=victim.name)):
        load_record(record_copy)


@pytest.mark.parametrize(
    ("n_test", "seed", "message"),
    [
        (30, 11, "covers 40 samples but the fashionmnist test split found has 30"),  # another size
        (40, 99, "original labels that differ"),  # other labels
    ],
    ids=["size", "labels"],
)
def test_a_dataset_that_disagrees_with_the_record_is_refused(record_copy, n_test, seed, message):
    write_idx_dataset(record_copy.parent.parent / "data" / "fashionmnist", n_train=60, n_test=n_test, seed=seed)
    with pytest.raises(RecordError, match=message):
        load_record(record_copy)


def test_png_path_outside_the_record_is_refused(record_copy):
    content = safe_torch_load(record_copy / RECORD_FILE)
    entry = next(iter(content["bd_test"]["bd_data_container"]["data_dict"].values()))
    entry["path"] = "../../../../etc/passwd"
    torch.save(content, record_copy / RECORD_FILE)
    with pytest.raises(RecordError, match="outside its folder"):
        load_record(record_copy)


@pytest.mark.parametrize(
    "change",
    [
        {"img_size": 28},
        {"num_classes": "ten"},
        {"bd_test": {"bd_data_container": {"data_dict": []}, "poison_indicator": 1, "original_index_array": []}},
        {"bd_test": {"bd_data_container": {"data_dict": {}}, "poison_indicator": 1.0, "original_index_array": 3}},
    ],
)
def test_malformed_fields_give_record_errors(record_copy, change):
    _rewrite(record_copy, **change)
    with pytest.raises(RecordError):
        load_record(record_copy)


def test_save_refuses_metadata_that_could_not_be_loaded_and_shares_the_folder(bench, tmp_path):
    with pytest.raises(FireDefenseError, match="metadata must hold only plain values"):
        save_record(tmp_path / "r", **_small_record(bench), metadata={"source": tmp_path})
    assert not (tmp_path / "r").exists()
    saved = save_record(tmp_path / "s", **_small_record(bench))
    assert saved.stat().st_mode & 0o055  # readable by others, like any folder (mkdtemp's 0700 undone)


def test_not_a_backdoorbench_file(record_copy):
    torch.save({"state_dict": {}}, record_copy / RECORD_FILE)
    with pytest.raises(RecordError, match="not a BackdoorBench attack result: it lacks model_name"):
        load_record(record_copy)


def test_malicious_record_is_refused(record_copy):
    from test_safe_load import _malicious_record

    sentinel = record_copy / "pwned"
    _malicious_record(record_copy / RECORD_FILE, sentinel)
    with pytest.raises(UnsafeFileError):
        load_record(record_copy)
    assert not sentinel.exists()


def test_cli_summarises_a_record_and_fails_in_one_line(bench, tmp_path):
    run = [sys.executable, "-m", "fire_adapters", "record-info"]
    shown = subprocess.run([*run, str(bench["record"])], capture_output=True, text=True, check=True).stdout
    assert "preactresnet18 (10 classes)" in shown and "fashionmnist" in shown
    failed = subprocess.run([*run, str(tmp_path / "nope")], capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().count("\n") == 0 and "Traceback" not in failed.stderr
    assert f"no {RECORD_FILE} in" in failed.stderr

"""Untrusted files and meaningless values are refused at the boundary, each in one line naming the problem and fix.

Issue 18, items 5 and 6 (and 2's ``make-records --out FILE``): every input here was once accepted silently or
ended in a traceback from deep inside torch, numpy or Pillow.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fire_adapters import (
    RECORD_FILE,
    ImageSet,
    InputNormalization,
    UnsafeFileError,
    create_model,
    find_dataset,
    load_dataset,
    load_record,
    safe_torch_load,
    save_record,
)
from fire_adapters.attacks import create_attack
from fire_adapters.factory import RecordRecipe, make_records
from fire_adapters.training import TrainConfig
from fire_defense import FIRE, FireDefenseError

from helpers import TinyCNN, write_idx_dataset


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    assert "weights_only=False" not in message and "`weights_only` set to `False`" not in message, message
    return message


# --- the record loader on untrusted files (item 5) and out-of-range labels (item 6) -------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A BackdoorBench-like root with a small synthetic Fashion-MNIST and one badnet-style record."""
    root = tmp_path_factory.mktemp("bb")
    write_idx_dataset(root / "data" / "fashionmnist", n_train=60, n_test=40, seed=11)
    test = load_dataset("fashionmnist", "test", root=root / "data")
    chosen = test.subset(np.flatnonzero(test.labels != 0))
    images = chosen.images.copy()
    images[:, -3:, -3:] = 255
    train = load_dataset("fashionmnist", "train", root=root / "data")
    poisoned_train = train.subset(np.arange(0, 60, 10))
    save_record(
        root / "record" / "demo",
        model=create_model("preactresnet18_w8", 10),
        model_name="preactresnet18_w8",
        num_classes=10,
        dataset="fashionmnist",
        poisoned_test=ImageSet(images, chosen.labels, chosen.indices, np.zeros(len(chosen))),
        test_size=len(test),
        poisoned_train=ImageSet(poisoned_train.images, poisoned_train.labels, poisoned_train.indices, np.zeros(6)),
        train_size=len(train),
    )
    return root


@pytest.fixture
def record(pristine, tmp_path):
    root = tmp_path / "bb"
    shutil.copytree(pristine, root)
    return root / "record" / "demo"


def _edit(change):
    """A damage that loads ``attack_result.pt``, applies ``change`` to its dict, and saves it again."""

    def damage(record_dir: Path) -> None:
        content = safe_torch_load(record_dir / RECORD_FILE)
        change(content)
        torch.save(content, record_dir / RECORD_FILE)

    return damage


def _first_entry(content: dict) -> dict:
    return next(iter(content["bd_test"]["bd_data_container"]["data_dict"].values()))


def _replace_first_entry(value):
    def change(content: dict) -> None:
        entries = content["bd_test"]["bd_data_container"]["data_dict"]
        entries[next(iter(entries))] = value

    return _edit(change)


def _set_other_info(value):
    return _edit(lambda content: _first_entry(content).__setitem__("other_info", value))


def _all_targets(target: int):
    def change(content: dict) -> None:
        for entry in content["bd_test"]["bd_data_container"]["data_dict"].values():
            entry["other_info"] = [target, entry["other_info"][1]]

    return _edit(change)


def _png_claiming(width: int, height: int):
    """A damage that replaces one poisoned PNG by a valid PNG header claiming ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    def damage(record_dir: Path) -> None:
        png = next((record_dir / "bd_test_dataset").rglob("*.png"))
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        png.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b"")
        )

    return damage


def _write(data: bytes):
    return lambda record_dir: (record_dir / RECORD_FILE).write_bytes(data)


BAD_RECORDS = {
    "text-file": (_write(b"hello world\nthis is not a torch file\n"), "not a readable torch file"),
    "empty-file": (_write(b""), "not a readable torch file"),
    "random-bytes-0": (_write(np.random.default_rng(0).bytes(4096)), "not a torch file that loads safely"),
    "random-bytes-1": (_write(np.random.default_rng(1).bytes(100)), "not a torch file that loads safely"),
    "random-bytes-2": (_write(np.random.default_rng(2).bytes(7)), "attack_result.pt"),
    "zip-header": (_write(b"PK\x03\x04" + bytes(60)), "not a readable torch file"),
    "png-bomb": (_png_claiming(30000, 30000), "too many pixels to decode safely"),
    "png-header-of-another-size": (_png_claiming(5000, 4000), "is 4000x5000 but fashionmnist images are 28x28"),
    "other-info-floats": (_set_other_info([0.5, 1.7]), r"other_info \[bd_label, label\] as integers"),
    "other-info-strings": (_set_other_info(["a", "b"]), r"other_info \[bd_label, label\] as integers"),
    "other-info-nan": (_set_other_info([float("nan"), 1]), r"other_info \[bd_label, label\] as integers"),
    "other-info-text": (_set_other_info("01"), r"other_info \[bd_label, label\] as integers"),
    "other-info-short": (_set_other_info([0]), r"other_info \[bd_label, label\] as integers"),
    "target-99": (_all_targets(99), "target label 99, outside the model's 10 classes"),
    "target-negative": (_all_targets(-1), "target label -1, outside the model's 10 classes"),
    "path-not-text": (_edit(lambda c: _first_entry(c).__setitem__("path", 5)), "needs a path string"),
    "path-with-a-nul-byte": (_edit(lambda c: _first_entry(c).__setitem__("path", "a\0b.png")), "needs a path string"),
    "entry-not-a-dict": (_replace_first_entry([1]), "lacks a path or"),
    "entry-none": (_replace_first_entry(None), "lacks a path or"),
    "string-for-a-tensor": (
        _edit(lambda c: c["model"].__setitem__("linear.weight", "abc")),
        r"non-tensor entries \(linear.weight\)",
    ),
    "fractional-indices": (
        _edit(lambda c: c["bd_test"].__setitem__("original_index_array", np.array([0.5, 1.5]))),
        "original_index_array must be an array of integer sample indices",
    ),
    "indicator-not-0-1": (
        _edit(lambda c: c["bd_test"].__setitem__("poison_indicator", np.full(40, 0.5))),
        "poison_indicator must be an array of 0s and 1s",
    ),
    "indicator-text": (
        _edit(lambda c: c["bd_test"].__setitem__("poison_indicator", "abc")),
        "poison_indicator must be an array of 0s and 1s",
    ),
    "train-indicator-text": (
        _edit(lambda c: c["bd_train"].__setitem__("poison_indicator", "abc")),
        r"\(train\): poison_indicator must be an array of 0s and 1s",
    ),
    "bd-train-text": (_edit(lambda c: c.__setitem__("bd_train", "abc")), "bd_train must be a dataset state or None"),
    "fractional-num-classes": (
        _edit(lambda c: c.__setitem__("num_classes", 10.5)),
        "malformed img_size or num_classes",
    ),
    "fractional-img-size": (
        _edit(lambda c: c.__setitem__("img_size", [28.5, 28, 1])),
        "malformed img_size or num_classes",
    ),
    "dataset-not-a-name": (_edit(lambda c: c.__setitem__("clean_data", 5)), "must be names"),
    "text-keys": (
        _edit(lambda c: c["bd_test"]["bd_data_container"].__setitem__("data_dict", {"x": {}})),
        "data_dict keys must be integer sample indices",
    ),
}


@pytest.mark.parametrize(("damage", "message"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_bad_record_is_one_line_naming_the_problem(record, damage, message):
    damage(record)
    with pytest.raises(FireDefenseError) as error:
        load_record(record)
    assert str(record) in _one_line(error) or "poisoned image" in str(error.value)
    assert error.match(message)


def test_the_pristine_record_loads(record):
    loaded = load_record(record)
    assert set(loaded.poisoned_test.targets.tolist()) == {0} and len(loaded.train_poison_indices) == 6


def test_an_object_array_is_refused_without_torchs_unsafe_advice(record):
    _edit(lambda c: c.__setitem__("note", np.array([object()], dtype=object)))(record)
    with pytest.raises(UnsafeFileError) as error:
        load_record(record)
    assert "ObjectDType" in _one_line(error) and "Re-save it from trusted code" in str(error.value)


# --- values that make the output meaningless (item 6) ------------------------------------------------------------


def test_a_data_folder_that_is_missing_or_a_file_is_refused(tmp_path, monkeypatch):
    write_idx_dataset(tmp_path / "cwd" / "data" / "fashionmnist")  # another copy it must not fall back to
    (tmp_path / "a-file").write_text("x")
    for root, problem in ((tmp_path / "missing", "does not exist"), (tmp_path / "a-file", "is not a folder")):
        with pytest.raises(FireDefenseError) as error:
            find_dataset("fashionmnist", root=root)
        assert f"{root} {problem}" in _one_line(error)
    monkeypatch.setenv("FIRE_DATA", str(tmp_path / "gone"))
    with pytest.raises(FireDefenseError, match=r"\$FIRE_DATA .*gone does not exist"):
        find_dataset("fashionmnist")
    monkeypatch.delenv("FIRE_DATA")
    assert find_dataset("fashionmnist")[0] == tmp_path / "cwd" / "data" / "fashionmnist"


def test_a_missing_data_folder_fails_the_command_line_in_one_line(pristine, tmp_path):
    run = [sys.executable, "-m", "fire_adapters", "record-info", str(pristine / "record" / "demo")]
    failed = subprocess.run([*run, "--data", str(tmp_path / "nope")], capture_output=True, text=True, check=False)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().count("\n") == 0 and "nope does not exist" in failed.stderr


BAD_TRAINING = {
    "lr-nan": ({"lr": float("nan")}, "lr must be a finite number > 0"),
    "lr-inf": ({"lr": float("inf")}, "lr must be a finite number > 0"),
    "lr-text": ({"lr": "0.1"}, "lr must be a finite number > 0"),
    "lr-zero": ({"lr": 0.0}, "lr must be a finite number > 0"),
    "epochs-fraction": ({"epochs": 1.5}, "epochs must be an integer >= 1"),
    "epochs-bool": ({"epochs": True}, "epochs must be an integer >= 1"),
    "batch-size-fraction": ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    "momentum-nan": ({"momentum": float("nan")}, r"momentum must be in \[0, 1\)"),
    "weight-decay-negative": ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
}


@pytest.mark.parametrize(("settings", "message"), BAD_TRAINING.values(), ids=BAD_TRAINING.keys())
def test_training_settings_are_checked(settings, message):
    with pytest.raises(FireDefenseError, match=message) as error:
        TrainConfig(**settings)
    _one_line(error)


def test_good_training_settings_pass():
    assert TrainConfig(epochs=np.int64(2), lr=1, weight_decay=0).epochs == 2


def test_the_normalisation_refuses_uint8_images():
    norm = InputNormalization((0.5,), (0.5,), out_channels=3)
    with pytest.raises(FireDefenseError, match=r"expected float images in \[0, 1\], got torch.uint8") as error:
        norm(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8))
    _one_line(error)
    assert norm(torch.ones(2, 1, 4, 4)).shape == (2, 3, 4, 4)


# --- FIRE's public boundary -------------------------------------------------------------------------------------


class NarrowCNN(TinyCNN):
    """TinyCNN's layer names with another width at ``layer3``: a state saved from one must not load in the other."""

    def __init__(self) -> None:
        super().__init__()
        self.layer3 = nn.Sequential(nn.Conv2d(32, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(32, 1, 12, 12, generator=generator)
    poisoned = clean[:8].clone()
    poisoned[..., -3:, -3:] = 1.0
    return clean, poisoned


def _fitted(data, **settings) -> FIRE:
    torch.manual_seed(0)
    clean, poisoned = data
    return FIRE(TinyCNN().eval(), layers="layer2", **settings).fit(clean, poisoned=poisoned)


BAD_SETTINGS = {
    "alpha-nan": ({"alpha": float("nan")}, "alpha must be a finite number"),
    "alpha-inf": ({"alpha": float("inf")}, "alpha must be a finite number"),
    "alpha-per-layer-nan": ({"alpha": {"layer2": float("nan")}}, "alpha must be a finite number"),
    "alpha-text": ({"alpha": "1"}, "alpha must be a finite number"),
    "fpr-nan": ({"fpr": float("nan")}, r"fpr must be in \(0, 1\)"),
    "fpr-text": ({"fpr": "0.1"}, "fpr must be a number"),
    "batch-size-fraction": ({"batch_size": 2.5}, "must be whole numbers; got batch_size=2.5"),
    "views-fraction": ({"views": 1.5}, "must be whole numbers; got views=1.5"),
    "rank-float": ({"rank": 1.0}, "must be whole numbers; got rank=1.0"),
    "target-share-nan": ({"target_share": float("nan")}, r"target_share must be in \(0, 1\]"),
    "layers-number": ({"layers": 123}, "layers must be 'auto', a layer name, a module, or a list of them; got 123"),
    "layers-none": ({"layers": None}, "layers must be 'auto', a layer name"),
    "layers-list-of-numbers": ({"layers": [1.5]}, "layers must be 'auto', a layer name"),
}


@pytest.mark.parametrize(("settings", "message"), BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
@pytest.mark.parametrize("how", ["fit", "partial_fit"])
def test_bad_settings_are_refused_before_any_pass(data, settings, message, how):
    clean, poisoned = data
    fire = FIRE(TinyCNN().eval(), **{"layers": "layer2", **settings})
    with pytest.raises(FireDefenseError, match=message) as error:
        fire.fit(clean, poisoned=poisoned) if how == "fit" else fire.partial_fit(clean)
    _one_line(error)
    assert not hasattr(fire, "stats_")


def _with(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = value
    return x


BAD_INPUTS = {
    "one-nan-image": (lambda x: _with(x, float("nan")), "hold NaN or infinite values"),
    "one-inf-image": (lambda x: _with(x, float("inf")), "hold NaN or infinite values"),
    "uint8-0-255": (lambda x: (x * 255).to(torch.uint8), r"are torch.uint8; give the float tensors"),
    "bool": (lambda x: x > 0.5, r"are torch.bool; give the float tensors"),
}


@pytest.mark.parametrize(("spoil", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
@pytest.mark.parametrize("where", ["clean", "poisoned", "stream-clean", "stream-poisoned", "forward", "scores"])
def test_inputs_that_would_give_meaningless_numbers_are_refused(data, spoil, message, where):
    clean, poisoned = data
    fire = FIRE(TinyCNN().eval(), layers="layer2")
    if where in ("forward", "scores"):
        fire.fit(clean, poisoned=poisoned)
        call = (lambda: fire(spoil(clean))) if where == "forward" else (lambda: fire.scores(spoil(clean)))
    elif where == "clean":
        call = lambda: fire.fit(spoil(clean), poisoned=poisoned)  # noqa: E731
    elif where == "poisoned":
        call = lambda: fire.fit(clean, poisoned=spoil(poisoned))  # noqa: E731
    elif where == "stream-clean":
        call = lambda: fire.partial_fit(spoil(clean))  # noqa: E731
    else:
        fire.partial_fit(clean)
        call = lambda: fire.partial_fit(poisoned=spoil(poisoned))  # noqa: E731
    with pytest.raises(FireDefenseError, match=message) as error:
        call()
    _one_line(error)


def test_a_nan_trigger_is_refused(data):
    clean, _ = data
    fire = FIRE(TinyCNN().eval(), layers="layer2")
    with pytest.raises(FireDefenseError, match="the triggered inputs hold NaN"):
        fire.fit(clean, trigger=lambda x: x * float("nan"))


@pytest.mark.parametrize(
    "x",
    [torch.rand(4, 1, 16, 16), torch.rand(1, 12, 12), torch.rand(4, 12, 12, 1)],
    ids=["another-size", "no-batch-dimension", "channels-last-layout"],
)
@pytest.mark.parametrize("condition", [None, "target"])
def test_inputs_of_another_size_are_one_line(data, x, condition):
    fire = _fitted(data, condition=condition)
    with pytest.raises(FireDefenseError, match=r"but FIRE was fitted on batches \(N, 1, 12, 12\)") as error:
        fire(x)
    _one_line(error)
    assert fire(data[0][:3]).shape == (3, 10)


def test_streaming_inputs_of_another_size_are_one_line(data):
    fire = FIRE(TinyCNN().eval(), layers="layer2").partial_fit(data[0])
    with pytest.raises(FireDefenseError, match=r"inputs must all be batches .* of one size") as error:
        fire.partial_fit(poisoned=torch.rand(2, 1, 16, 16))
    _one_line(error)


@pytest.mark.parametrize(
    ("saved_from", "loaded_into", "shapes"),
    [
        (TinyCNN, NarrowCNN, r"\(32, 3, 3\), this model's \(8, 3, 3\)"),
        (NarrowCNN, TinyCNN, r"\(8, 3, 3\), this model's \(32, 3, 3\)"),
    ],
    ids=["wide-into-narrow", "narrow-into-wide"],
)
def test_a_state_from_another_model_is_refused_and_changes_nothing(data, tmp_path, saved_from, loaded_into, shapes):
    clean, poisoned = data
    FIRE(saved_from().eval(), layers="layer3").fit(clean, poisoned=poisoned).save(tmp_path / "state.pt")
    with pytest.raises(
        FireDefenseError, match=f"saved from another model: its layer3 activations are {shapes}"
    ) as error:
        FIRE(loaded_into().eval()).load(tmp_path / "state.pt")
    _one_line(error)
    again = FIRE(saved_from().eval()).load(tmp_path / "state.pt")
    assert again.input_shape_ == (1, 12, 12) and torch.isfinite(again(clean)).all()


def _spoil_state(change):
    def spoil(state: dict) -> dict:
        change(state)
        return state

    return spoil


BAD_STATES = {
    "nan-sums": (
        _spoil_state(lambda s: s["layers"]["layer2"]["sums"].__setitem__("clean", torch.full((4,), float("nan")))),
        "sums holds NaN or infinite values",
    ),
    "text-for-a-tensor": (
        _spoil_state(lambda s: s["layers"]["layer2"]["sums"].__setitem__("clean", "abc")),
        "sums holds a str, not a float tensor",
    ),
    "calibration-of-another-size": (
        _spoil_state(lambda s: s["layers"]["layer2"].__setitem__("calibration", torch.zeros(3, 5))),
        r"calibration is \(3, 5\)",
    ),
    "fractional-counts": (
        _spoil_state(lambda s: s["layers"]["layer2"]["counts"].__setitem__("clean", 1.5)),
        "counts must be whole numbers",
    ),
    "alpha-nan": (_spoil_state(lambda s: s["config"].__setitem__("alpha", float("nan"))), "alpha must be a finite"),
    "bad-input-shape": (_spoil_state(lambda s: s["config"].__setitem__("input_shape", [1, -3])), "input_shape"),
}


@pytest.mark.parametrize(("spoil", "message"), BAD_STATES.values(), ids=BAD_STATES.keys())
def test_a_bad_state_is_one_line_and_changes_nothing(data, spoil, message):
    fire = _fitted(data)
    before = fire(data[0])
    with pytest.raises(FireDefenseError, match=message) as error:
        fire.load_state_dict(spoil(fire.state_dict()))
    _one_line(error)
    torch.testing.assert_close(fire(data[0]), before)


def test_a_state_file_of_random_bytes_gives_no_unsafe_advice(data, tmp_path):
    (tmp_path / "state.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(FireDefenseError, match="is not a FIRE state file that loads safely") as error:
        FIRE(TinyCNN().eval()).load(tmp_path / "state.pt")
    _one_line(error)


# --- an output location that cannot be written fails before any training (item 2) ---------------------------------


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("fire_adapters.factory.train_backdoored_model", refuse)
    monkeypatch.setattr("fire_adapters.factory.load_dataset", refuse)


def test_make_records_into_a_file_fails_before_training(tmp_path, no_training):
    (tmp_path / "out").write_text("x")
    for out in (tmp_path / "out", tmp_path / "out" / "below"):
        with pytest.raises(FireDefenseError, match=r"is a file|cannot write records into") as error:
            make_records([RecordRecipe("fashionmnist", "badnet")], out, progress=False)
        _one_line(error)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write into read-only folders")
def test_make_records_into_a_read_only_folder_fails_before_training(tmp_path, no_training):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(FireDefenseError, match=r"cannot write records into .*ro") as error:
            make_records([RecordRecipe("fashionmnist", "badnet")], tmp_path / "ro", progress=False)
        _one_line(error)
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_make_records_command_line_into_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("x")
    command = [sys.executable, "-m", "fire_adapters", "make-records", "--attacks", "badnet", "--out"]
    failed = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, check=False, timeout=60)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().count("\n") == 0 and "is a file" in failed.stderr


BAD_ATTACK_PARAMETERS = {
    "fractional-target": ("badnet", {"target": 1.5}, "target must be an integer, got 1.5"),
    "bool-target": ("badnet", {"target": True}, "target must be an integer, got True"),
    "fractional-seed": ("blended", {"seed": 0.5}, "seed must be an integer"),
    "nan-ratio": ("badnet", {"ratio": float("nan")}, "ratio must be a finite number"),
    "nan-strength": ("wanet", {"s": float("nan")}, "s must be a finite number"),
    "fractional-grid": ("wanet", {"k": 4.5}, "k must be an integer"),
    "inf-delta": ("sig", {"delta": float("inf")}, "delta must be a finite number"),
    "text-flag": ("badnet", {"all_to_all": "yes"}, "all_to_all must be True or False"),
}


@pytest.mark.parametrize(("attack", "settings", "message"), BAD_ATTACK_PARAMETERS.values(), ids=BAD_ATTACK_PARAMETERS)
def test_attack_parameters_of_the_wrong_kind_are_refused(attack, settings, message):
    with pytest.raises(FireDefenseError, match=message) as error:
        create_attack(attack, "fashionmnist", **settings)
    _one_line(error)
    assert create_attack(attack, "fashionmnist", target=np.int64(3), ratio=1).target == 3


def test_save_record_refuses_target_labels_outside_the_classes(pristine, tmp_path):
    test = load_dataset("fashionmnist", "test", root=pristine / "data")
    chosen = test.subset(np.arange(4))
    with pytest.raises(FireDefenseError, match=r"poisoned test targets span 99\.\.99, outside the 10 classes") as error:
        save_record(
            tmp_path / "r",
            model=create_model("preactresnet18_w8", 10),
            model_name="preactresnet18_w8",
            num_classes=10,
            dataset="fashionmnist",
            poisoned_test=ImageSet(chosen.images, chosen.labels, chosen.indices, np.full(4, 99)),
            test_size=len(test),
        )
    _one_line(error)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("seed", [1.5, -1, "0", True], ids=["fraction", "negative", "text", "bool"])
def test_a_recipe_seed_must_be_a_whole_number(seed):
    with pytest.raises(FireDefenseError, match="a recipe's seed must be an integer >= 0") as error:
        RecordRecipe("fashionmnist", "badnet", seed=seed)
    _one_line(error)
    assert RecordRecipe("fashionmnist", "badnet", seed=np.int64(2)).name.endswith("seed2")

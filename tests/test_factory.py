"""Making records: a tiny end-to-end run, caching, determinism, atomicity and the CLI."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from fire_adapters import factory as factory_module
from fire_adapters import load_record
from fire_adapters.__main__ import main
from fire_adapters.attacks import create_attack
from fire_adapters.factory import RecordRecipe, load_attack, make_record, make_records, model_training, summary_csv
from fire_adapters.training import TrainConfig, augment
from fire_defense import FireDefenseError

from helpers import interrupt_image_writes, write_idx_dataset

TINY = TrainConfig(epochs=1, batch_size=32, lr=0.05)


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    write_idx_dataset(root / "fashionmnist", n_train=256, n_test=64, seed=3)
    return root


def recipe(attack: str = "badnet", seed: int = 0) -> RecordRecipe:
    return RecordRecipe("fashionmnist", attack, model="preactresnet18_w8", seed=seed, train=TINY)


@pytest.mark.parametrize("attack", ["badnet", "inputaware"])
def test_a_tiny_run_makes_a_record_that_loads_back(data, tmp_path, attack):
    made = make_record(recipe(attack), tmp_path / "records", data_root=data, progress=False)
    assert not made.cached and set(made.metrics) == {"test_acc", "test_asr", "test_ra"}
    record = load_record(made.path, data_root=data)
    assert record.model_name == "preactresnet18_w8" and record.metadata["recipe"] == recipe(attack).as_dict()
    if attack == "inputaware":  # poisoned anew in every batch: no fixed poisoned training set
        assert record.train_poison_indices is None
    else:
        assert len(record.train_poison_indices) == round(0.1 * 256)
    assert (record.poisoned_test.targets == 0).all() and (record.poisoned_test.labels != 0).all()
    # The trigger is rebuilt from the record and reproduces its poisoned images.
    clean = record.clean_test.images[record.poisoned_test.indices]
    np.testing.assert_array_equal(load_attack(record)(clean), record.poisoned_test.images)
    with open(made.path / "attack_df_summary.csv") as handle:
        rows = {row[""]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"last", "valid_max", "exist_nan_value"}
    assert float(rows["last"]["test_asr"]) == pytest.approx(made.metrics["test_asr"])


def test_a_finished_record_is_never_rebuilt(data, tmp_path, monkeypatch):
    first = make_record(recipe(), tmp_path, data_root=data, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("retrained a finished record")

    monkeypatch.setattr(factory_module, "train_backdoored_model", no_training)
    again = make_record(recipe(), tmp_path, data_root=data, progress=False)
    assert again.cached and again.metrics == first.metrics and again.path == first.path
    other = RecordRecipe(
        "fashionmnist", "badnet", model="preactresnet18_w8", train=TrainConfig(epochs=2, batch_size=32)
    )
    with pytest.raises(FireDefenseError, match=r"made from another recipe.*--overwrite"):
        make_record(other, tmp_path, data_root=data, progress=False)
    # the same recipe, but the attack's default changed since the record was made: another trigger, not this record
    changed = recipe().create_attack().params() | {"patch_size": 5}
    monkeypatch.setattr(RecordRecipe, "create_attack", lambda self: create_attack("badnet", **changed))
    with pytest.raises(FireDefenseError, match=r"badnet settings its defaults no longer give \(patch_size changed\)"):
        make_record(recipe(), tmp_path, data_root=data, progress=False)


def test_a_recipe_cannot_set_what_it_sets_itself():
    with pytest.raises(FireDefenseError, match="attack_params may not set seed"):
        RecordRecipe("fashionmnist", "badnet", attack_params={"seed": 3})


def test_an_interrupted_build_leaves_no_record(data, tmp_path, monkeypatch):
    interrupt_image_writes(monkeypatch)  # while it writes the poisoned images
    with pytest.raises(KeyboardInterrupt):
        make_record(recipe(), tmp_path / "records", data_root=data, progress=False)
    assert list((tmp_path / "records").iterdir()) == []


def test_same_seed_same_poison_trigger_and_model(data, tmp_path):
    a = load_record(make_record(recipe("wanet"), tmp_path / "a", data_root=data, progress=False).path, data_root=data)
    b = load_record(make_record(recipe("wanet"), tmp_path / "b", data_root=data, progress=False).path, data_root=data)
    c = load_record(
        make_record(recipe("wanet", 1), tmp_path / "c", data_root=data, progress=False).path, data_root=data
    )
    np.testing.assert_array_equal(a.train_poison_indices, b.train_poison_indices)
    np.testing.assert_array_equal(a.poisoned_test.images, b.poisoned_test.images)
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not np.array_equal(a.train_poison_indices, c.train_poison_indices)
    assert not np.array_equal(a.poisoned_test.images, c.poisoned_test.images)


def test_augment_crops_from_the_padded_image_and_flips():
    images = torch.rand(5, 3, 6, 7)
    out = augment(images, 2, False, torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    dy, dx = torch.randint(0, 5, (5,), generator=generator), torch.randint(0, 5, (5,), generator=generator)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    expected = torch.stack([padded[i, :, dy[i] : dy[i] + 6, dx[i] : dx[i] + 7] for i in range(5)])
    assert torch.equal(out, expected)
    assert torch.equal(augment(images, 0, False, torch.Generator()), images)
    flipped = augment(images, 0, True, torch.Generator().manual_seed(0))
    for original, result in zip(images, flipped, strict=True):
        assert torch.equal(result, original) or torch.equal(result, original.flip(-1))


def test_summary_csv_has_backdoorbench_rows():
    text = summary_csv([{"epoch": 1, "test_acc": ""}, {"epoch": 2, "test_acc": 0.5}], ["epoch", "test_acc"])
    assert text.splitlines() == [",epoch,test_acc", "last,2.0,0.5", "valid_max,2.0,0.5", "exist_nan_value,False,False"]


def test_cli_makes_records_and_reports_them(data, tmp_path, capsys):
    argv = [
        "make-records",
        "--attacks",
        "badnet,sig",
        "--model",
        "preactresnet18_w8",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path / "out"),
        "--data",
        str(data),
    ]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert (
        "fashionmnist_preactresnet18_w8_badnet_seed0" in shown and "fashionmnist_preactresnet18_w8_sig_seed0" in shown
    )
    assert main(argv) == 0
    assert shown.count("(cached)") == 0 and capsys.readouterr().out.count("(cached)") == 2
    assert main([*argv[:2], "nonsense", *argv[3:]]) == 2
    assert "unknown attack 'nonsense'" in capsys.readouterr().err


def test_cli_trains_each_model_by_its_own_recipe_unless_told_otherwise(tmp_path, monkeypatch):
    import fire_adapters.__main__ as cli

    made: list[RecordRecipe] = []
    monkeypatch.setattr(cli, "make_records", lambda recipes, *args: made.extend(recipes) or [])
    argv = ["make-records", "--attacks", "badnet", "--out", str(tmp_path)]
    assert main([*argv, "--model", "vit_p4_d6"]) == 0  # the zoo's recipe: AdamW, its own rate and epochs
    assert made[-1].train == model_training("vit_p4_d6") and made[-1].train.optimizer == "adamw"
    assert main([*argv, "--model", "vit_p4_d6", "--epochs", "3", "--optimizer", "sgd"]) == 0  # the options win
    assert made[-1].train == model_training("vit_p4_d6", {"epochs": 3, "optimizer": "sgd"})
    assert main(argv) == 0 and made[-1].train == TrainConfig()  # the default model: TrainConfig's defaults


def test_cli_makes_an_all_to_all_record_under_its_own_name(data, tmp_path, capsys):
    argv = ["make-records", "--attacks", "badnet", "--epochs", "1", "--batch-size", "32", "--data", str(data)]
    assert main([*argv, "--all-to-all", "--out", str(tmp_path / "out")]) == 0
    assert "fashionmnist_preactresnet18_w8_badnet-all2all_seed0" in capsys.readouterr().out
    record = load_record(tmp_path / "out" / "fashionmnist_preactresnet18_w8_badnet-all2all_seed0", data_root=data)
    assert record.metadata["attack"] == "badnet-all2all" and record.metadata["recipe"]["attack"] == "badnet"
    np.testing.assert_array_equal(record.poisoned_test.targets, (record.poisoned_test.labels + 1) % 10)
    # The same through --attack-params, and any other parameters under a label of the user's.
    assert main([*argv, "--attack-params", '{"all_to_all": true}', "--out", str(tmp_path / "out")]) == 0
    assert "(cached)" in capsys.readouterr().out
    labelled = [*argv, "--attack-params", '{"ratio": 0.5}', "--label", "badnet-r50", "--out", str(tmp_path / "l")]
    assert main(labelled) == 0
    record = load_record(tmp_path / "l" / "fashionmnist_preactresnet18_w8_badnet-r50_seed0", data_root=data)
    assert record.metadata["attack"] == "badnet-r50" and len(record.train_poison_indices) == 128


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--attack-params", "{ratio: 0.5}"], "--attack-params is not valid JSON"),
        (["--attack-params", "[1]"], "--attack-params must be a JSON object"),
        (["--attack-params", '{"all_to_all": false}', "--all-to-all"], "--all-to-all contradicts"),
        (["--attack-params", '{"patch": 3}'], "attack 'badnet' takes no patch"),
        (["--attacks", "badnet,sig", "--all-to-all"], "sig is a clean-label attack"),
        (["--attacks", "badnet,blended", "--label", "mine"], "--label names one attack's records"),
        (["--label", "my/label"], "label names its record folder"),
    ],
)
def test_cli_refuses_attack_parameters_before_training(data, tmp_path, capsys, monkeypatch, extra, message):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing")

    monkeypatch.setattr(factory_module, "train_backdoored_model", no_training)
    argv = ["make-records", "--attacks", "badnet", "--epochs", "1", "--out", str(tmp_path / "out"), "--data", str(data)]
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err


def test_two_different_recipes_may_not_make_one_record(tmp_path):
    same_name = [recipe(), RecordRecipe("fashionmnist", "badnet", attack_params={"ratio": 0.2}, train=TINY)]
    with pytest.raises(FireDefenseError, match="two different recipes would make the record"):
        make_records(same_name, tmp_path)

"""All-to-all records end to end: asked for from a grid, named apart from the all-to-one record, per-sample
targets through the record and the metrics, and what FIRE does when the seen poisoned inputs point to every class."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from fire_adapters import load_record
from fire_adapters.factory import RecordRecipe, load_attack, make_record
from fire_adapters.preprocess import to_tensor
from fire_adapters.training import TrainConfig
from fire_bench.evaluation import evaluate, protocol_split
from fire_bench.grid import AttackSpec, DefenseSpec, Protocol, load_grid
from fire_defense import FireDefenseError
from fire_defense.metrics import backdoor_metrics, predict

from helpers import write_idx

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 10
N_TRAIN, N_TEST = 1200, 300
# A learnable all-to-all backdoor in seconds (measured: clean acc 99.7%, ASR 99.3%): an 8x8 patch (the trainer's
# 4-pixel random crop cannot hide it) on 40% of the training set, five epochs.
RECIPE = RecordRecipe(
    "fashionmnist",
    "badnet",
    attack_params={"all_to_all": True, "patch_size": 8, "ratio": 0.4},
    train=TrainConfig(epochs=5, batch_size=32, lr=0.1),
)
PROTOCOL = Protocol(clean_size=200, k=10, defender_share=0.1, eval_clean=None, eval_poisoned=None)


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey 28x28 images whose class is a stripe pattern (5 periods x 2 orientations) at a random phase, in noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=n)
    periods = np.array([3, 5, 8, 12, 18])[labels % 5]
    wave = np.sin(2 * np.pi * np.arange(28)[None, :] / periods[:, None] + rng.uniform(0, 2 * np.pi, size=(n, 1)))
    rows, columns = np.repeat(wave[:, :, None], 28, 2), np.repeat(wave[:, None, :], 28, 1)
    images = 110 + 80 * np.where((labels < 5)[:, None, None], rows, columns) + rng.normal(0, 20, size=(n, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny all-to-all BadNets record, made by the factory, and its data root."""
    root = tmp_path_factory.mktemp("a2a")
    folder = root / "data" / "fashionmnist"
    folder.mkdir(parents=True)
    for prefix, n, seed in (("train", N_TRAIN, 1), ("t10k", N_TEST, 2)):
        images, labels = stripes(n, seed)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, True)
    return make_record(RECIPE, root / "records", data_root=root / "data", progress=False), root / "data"


# --- asking for one: names, the grid ---------------------------------------------------------------------------


def test_an_all_to_all_record_is_named_apart_and_an_all_to_one_keeps_its_name():
    one = RecordRecipe("fashionmnist", "badnet")
    every = RecordRecipe("fashionmnist", "badnet", attack_params={"all_to_all": True})
    assert one.name == "fashionmnist_preactresnet18_w8_badnet_seed0" and "label" not in one.as_dict()
    assert (
        every.name == "fashionmnist_preactresnet18_w8_badnet-all2all_seed0" and every.attack_label == "badnet-all2all"
    )
    named = RecordRecipe("fashionmnist", "badnet", attack_params={"ratio": 0.05}, label="badnet-r05")
    assert named.name == "fashionmnist_preactresnet18_w8_badnet-r05_seed0" and named.as_dict()["label"] == "badnet-r05"
    for label in ("", "a/b", "-x", "a_b", 3):
        with pytest.raises(FireDefenseError, match="label names its record folder"):
            RecordRecipe("fashionmnist", "badnet", label=label)


def test_a_grid_asks_for_an_all_to_all_record_and_the_default_grid_keeps_its_records(tmp_path):
    path = tmp_path / "g.yaml"
    attacks = ["badnet", {"name": "badnet", "params": {"all_to_all": True}}, {"name": "blended", "label": "blended-x"}]
    path.write_text(yaml.safe_dump({"make": {"attacks": attacks}, "defenses": [{"name": "none"}]}))
    make = load_grid(path).make
    assert make.attacks == (
        "badnet",
        AttackSpec("badnet", {"all_to_all": True}),
        AttackSpec("blended", {}, "blended-x"),
    )
    recipes = make.recipes()
    assert [r.attack_label for r in recipes] == ["badnet", "badnet-all2all", "blended-x"]
    assert recipes[1].attack_params == {"all_to_all": True} and recipes[1].train == TrainConfig(epochs=make.epochs)
    default = load_grid("default").make.recipes()  # the records the default grid made before are found by these names
    attacks = ("badnet", "blended", "sig", "wanet")
    assert [r.name for r in default] == [f"fashionmnist_preactresnet18_w8_{a}_seed0" for a in attacks]
    assert all("label" not in r.as_dict() and r.attack_params == {} for r in default)


@pytest.mark.parametrize(
    ("attacks", "message"),
    [
        ([{"name": "sig", "params": {"all_to_all": True}}], r"attacks\[0\]: sig is a clean-label attack"),
        ([{"name": "badnet", "params": {"patch": 3}}], r"attacks\[0\]: attack 'badnet' takes no patch"),
        ([{"name": "badnet", "params": {"all_to_all": "yes"}}], r"attacks\[0\]: .*all_to_all must be True or False"),
        ([{"name": "badnet", "params": {"seed": 1}}], r"attacks\[0\]: attack_params may not set seed"),
        ([{"name": "badnet", "label": "a/b"}], r"attacks\[0\]: a recipe's label names its record folder"),
        ([{"name": "badnt"}], r"attacks\[0\]: unknown attack 'badnt'"),
        ([{"nme": "badnet"}], r"attacks\[0\]: unknown key\(s\) nme"),
        ([3], r"attacks\[0\] must be an attack name or a mapping"),
        (["badnet", {"name": "badnet"}], r"attacks\[0\] and attacks\[1\] both make badnet records"),
        (
            [{"name": "badnet", "params": {"all_to_all": True}}, {"name": "badnet", "params": {"all_to_all": True}}],
            r"attacks\[0\] and attacks\[1\] both make badnet-all2all records; give one of them another label",
        ),
    ],
)
def test_a_grid_refuses_an_attack_entry_it_could_not_make(tmp_path, attacks, message):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"make": {"attacks": attacks}, "defenses": [{"name": "none"}]}))
    with pytest.raises(FireDefenseError, match=r"g\.yaml: make: " + message):
        load_grid(path)


# --- the record: per-sample targets, the metrics, FIRE ---------------------------------------------------------


def test_the_record_stores_each_poisoned_test_sample_its_own_target(made):
    record_made, data = made
    record = load_record(record_made.path, data_root=data)
    assert record_made.path.name == "fashionmnist_preactresnet18_w8_badnet-all2all_seed0"
    assert record.metadata["attack"] == "badnet-all2all" and record.metadata["attack_params"]["all_to_all"] is True
    poisoned = record.poisoned_test
    assert len(poisoned) == N_TEST  # every label changes under all-to-all: every test sample is poisoned
    np.testing.assert_array_equal(poisoned.targets, (poisoned.labels + 1) % CLASSES)
    assert len(np.unique(poisoned.targets)) == CLASSES
    clean = record.clean_test.images[poisoned.indices]
    np.testing.assert_array_equal(load_attack(record)(clean), poisoned.images)  # the recipe names the attack


def test_the_attack_success_rate_counts_each_sample_s_own_target(made):
    record_made, data = made
    record = load_record(record_made.path, data_root=data)
    poisoned, clean = record.poisoned_test, record.clean_test
    classifier = record.classifier()
    on_poisoned = predict(classifier, to_tensor(poisoned.images))
    on_clean = predict(classifier, to_tensor(clean.images))
    metrics = backdoor_metrics(on_clean, clean.labels, on_poisoned, poisoned.labels, poisoned.targets)
    assert metrics["test_asr"] == pytest.approx(np.mean(on_poisoned == (poisoned.labels + 1) % CLASSES))
    assert metrics["test_asr"] == pytest.approx(record_made.metrics["test_asr"])
    assert metrics["test_asr"] > 0.9 and metrics["test_acc"] > 0.9  # the backdoor took
    assert np.mean(on_poisoned == 0) < 0.2  # read as all-to-one (target 0), the same model would look clean
    split = protocol_split(record, PROTOCOL, 0)
    row = evaluate(record, split, DefenseSpec("none"), PROTOCOL).row
    expected = np.mean(predict(classifier, to_tensor(split.poisoned_eval.images)) == split.poisoned_eval.targets)
    assert row["attack_name"] == "badnet-all2all" and row["test_asr"] == pytest.approx(expected)


def test_fire_infers_every_class_as_a_target_and_still_repairs(made):
    """The k = 10 seen poisoned inputs point to many classes, none to half of them: FIRE assumes no single target,
    so every input the gate flags is repaired (measured: ASR 99.3% -> 0.0%, clean accuracy 99.6% -> 98.5%)."""
    record_made, data = made
    record = load_record(record_made.path, data_root=data)
    split = protocol_split(record, PROTOCOL, 0)
    seen = split.poisoned_inputs(PROTOCOL.k)
    assert np.bincount(seen.targets, minlength=CLASSES).max() < PROTOCOL.k / 2  # no majority among the seen
    undefended = evaluate(record, split, DefenseSpec("none"), PROTOCOL).row
    fire = evaluate(record, split, DefenseSpec("fire"), PROTOCOL)
    assert fire.defense.fire_.condition_.targets == list(range(CLASSES))
    assert undefended["test_asr"] > 0.9 and fire.row["test_asr"] < 0.1
    assert fire.row["test_acc"] > undefended["test_acc"] - 0.05

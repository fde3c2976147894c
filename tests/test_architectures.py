"""Our narrow VGG-19-BN and small ViT: they take 28 and 32 pixel images, rebuild from their names, and FIRE
finds their stages and repairs a backdoor in them with its automatic layer choice; a model's training recipe
(the optimiser, the zoo's recommended settings, a grid's per-model overrides)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from fire_adapters import create_model, load_model_state, with_normalization
from fire_adapters.factory import RecordRecipe, model_training
from fire_adapters.models import MODELS
from fire_adapters.models.zoo import TRAINING, training_recipe
from fire_adapters.preprocess import InputNormalization
from fire_adapters.training import TrainConfig, _optimizer
from fire_bench.grid import load_grid
from fire_defense import FIRE, FireDefenseError, candidate_layers
from fire_defense.metrics import predict

from helpers import tiny_backdoored_model

pytestmark = pytest.mark.usefixtures("one_thread")

VGG_POOLS = [f"features.{i}" for i in (6, 13, 26, 39, 52)]  # the five max pools of VGG-19's layout
VIT_BLOCKS = [f"blocks.{i}" for i in range(6)]


@pytest.mark.parametrize(
    ("name", "dataset", "channels", "size"),
    [
        ("vgg19_bn_w8", "fashionmnist", 1, 28),
        ("vgg19_bn_w8", "cifar10", 3, 32),
        ("vit_p4_d6", "fashionmnist", 1, 28),
        ("vit_p4_d6", "cifar10", 3, 32),
    ],
)
def test_both_take_28_and_32_pixel_images_behind_the_normalisation(name, dataset, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    classifier = with_normalization(model, dataset).eval()
    assert classifier[0].out_channels == 3  # a 3-channel stem: grey images are repeated
    with torch.inference_mode():
        out = classifier(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_vgg_stages_are_its_five_pools_and_end_at_one_pixel():
    model = create_model("vgg19_bn_w8", num_classes=10).eval()
    assert candidate_layers(model) == VGG_POOLS
    assert [model.get_submodule(name).__class__ for name in VGG_POOLS] == [nn.MaxPool2d] * 5
    sizes = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o: sizes.append(o.shape[1:])) for n in VGG_POOLS]
    with torch.inference_mode():
        model(torch.rand(1, 3, 28, 28))
    for hook in hooks:
        hook.remove()
    assert [tuple(size) for size in sizes] == [(8, 14, 14), (16, 7, 7), (32, 4, 4), (64, 2, 2), (64, 1, 1)]
    assert [m.out_features for m in model.classifier if isinstance(m, nn.Linear)] == [512, 512, 10]


def test_vit_stages_are_its_blocks_and_its_tokens_follow_the_image_size():
    model = create_model("vit_p4_d6", num_classes=10).eval()
    assert candidate_layers(model) == VIT_BLOCKS
    assert candidate_layers(with_normalization(model, "fashionmnist")) == [f"1.{b}" for b in VIT_BLOCKS]
    shapes = []
    hook = model.get_submodule("blocks.5").register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.inference_mode():
        model(torch.rand(1, 3, 28, 28))
        model(torch.rand(1, 3, 32, 32))
    hook.remove()
    assert shapes == [(1, 1 + 7 * 7, 64), (1, 1 + 8 * 8, 64)]  # class token + patches of 4 pixels


@pytest.mark.parametrize("name", ["vgg19_bn_w8", "vit_p4_d6"])
def test_a_record_rebuilds_them_by_name(name):
    torch.manual_seed(1)
    source = create_model(name, num_classes=10).eval()
    torch.manual_seed(2)
    rebuilt = load_model_state(create_model(name, num_classes=10), source.state_dict()).eval()
    x = torch.rand(3, 3, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt(x), source(x))


def _grey(name: str) -> nn.Module:
    """The zoo model behind a grey-input normalisation, for the tiny 16x16 grey task."""
    return nn.Sequential(InputNormalization([0.5], [0.5], out_channels=3), create_model(name, num_classes=10))


@pytest.mark.parametrize(("name", "stages"), [("vgg19_bn_w8", VGG_POOLS), ("vit_p4_d6", VIT_BLOCKS)])
def test_fire_auto_layer_repairs_a_backdoor_in_each(name, stages):
    model, reference, seen, test_x, test_y, poisoned_x, _ = tiny_backdoored_model(
        lambda: _grey(name), n_train=2000, epochs=4
    )
    clean_acc = (predict(model, test_x) == test_y.numpy()).mean()
    asr = (predict(model, poisoned_x) == 0).mean()
    assert clean_acc > 0.9 and asr > 0.9  # the backdoor took
    fire = FIRE(model, mode="gate").fit(reference, poisoned=seen)
    assert set(fire.layer_scores_) == {f"1.{s}" for s in stages}
    assert fire.layers_[0] in fire.layer_scores_
    assert all(np.isfinite(list(v.values())).all() for v in fire.layer_scores_.values())
    assert (predict(fire, poisoned_x) == 0).mean() < 0.5 * asr
    assert (predict(fire, test_x) == test_y.numpy()).mean() > clean_acc - 0.05


# --- training recipes: the optimiser, a model's own recipe, a grid's models and overrides -----------------------

# What every record made before the optimiser choice stores as its training; they are found by it.
LEGACY_TRAIN = {"epochs": 4, "batch_size": 128, "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}


def test_the_optimiser_is_a_checked_setting_stored_only_when_not_sgd():
    assert TrainConfig().as_dict() == LEGACY_TRAIN  # so existing records' recipes still match
    assert RecordRecipe("fashionmnist", "badnet").as_dict()["train"] == LEGACY_TRAIN
    adamw = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.05)
    assert adamw.as_dict() == {**LEGACY_TRAIN, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05}
    for bad in ("adam", "SGD", None, 1):
        with pytest.raises(FireDefenseError, match="optimizer must be one of sgd, adamw") as error:
            TrainConfig(optimizer=bad)
        assert "\n" not in str(error.value)
    model = nn.Linear(3, 2)
    built = _optimizer(model, adamw)
    assert isinstance(built, torch.optim.AdamW) and built.defaults["weight_decay"] == 0.05
    sgd = _optimizer(model, TrainConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4


def test_a_model_trains_with_its_own_recipe_unless_the_recipe_gives_one():
    assert TRAINING and all(name in MODELS for name in TRAINING)
    for name in TRAINING:  # every declared recipe is a valid TrainConfig
        assert model_training(name) == TrainConfig(**TRAINING[name])
    assert training_recipe("vit_p4_d6")["optimizer"] == "adamw"
    assert RecordRecipe("fashionmnist", "badnet", "vit_p4_d6").train == model_training("vit_p4_d6")
    assert RecordRecipe("fashionmnist", "badnet", "vgg19_bn_w8").train == TrainConfig()
    given = TrainConfig(epochs=1)
    assert RecordRecipe("fashionmnist", "badnet", "vit_p4_d6", train=given).train == given
    assert model_training("vit_p4_d6", {"epochs": 9}).epochs == 9
    with pytest.raises(FireDefenseError, match="vit_p4_d6's training has no setting lrr; the settings: epochs"):
        model_training("vit_p4_d6", {"lrr": 1e-3})


def _make(tmp_path, make: dict):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"make": make, "defenses": [{"name": "none"}]}))
    return load_grid(path).make


def test_a_grid_trains_several_models_each_with_its_recipe_and_overrides(tmp_path):
    make = _make(
        tmp_path,
        {
            "models": ["preactresnet18_w8", "vit_p4_d6", "vgg19_bn_w8"],
            "attacks": ["badnet"],
            "seeds": [0, 1],
            "epochs": 2,
            "training": {"vgg19_bn_w8": {"lr": 0.1}},
        },
    )
    recipes = make.recipes()
    assert [(r.model, r.seed) for r in recipes] == [
        (m, s) for m in ("preactresnet18_w8", "vit_p4_d6", "vgg19_bn_w8") for s in (0, 1)
    ]
    train = {r.model: r.train for r in recipes}
    assert train["preactresnet18_w8"] == TrainConfig(epochs=2)  # the grid's epochs for the default recipe
    assert train["vit_p4_d6"] == model_training("vit_p4_d6")  # its recipe sets its epochs; the grid's do not
    assert train["vgg19_bn_w8"] == TrainConfig(epochs=2, lr=0.1)
    vit = _make(tmp_path, {"models": ["vit_p4_d6"], "training": {"vit_p4_d6": {"epochs": 7, "lr": 3e-3}}})
    assert vit.recipes()[0].train == model_training("vit_p4_d6", {"epochs": 7, "lr": 3e-3})
    one = _make(tmp_path, {"model": "vgg19_bn_w8"})  # the one-model key every existing grid uses
    assert one.models == ("vgg19_bn_w8",) and {r.model for r in one.recipes()} == {"vgg19_bn_w8"}
    assert _make(tmp_path, {}).models == ("preactresnet18_w8",)
    assert [r.name for r in load_grid("default").make.recipes()] == [
        f"fashionmnist_preactresnet18_w8_{a}_seed0" for a in ("badnet", "blended", "sig", "wanet")
    ]
    assert all(r.as_dict()["train"] == LEGACY_TRAIN for r in load_grid("default").make.recipes())


BAD_MAKE = {  # make: settings -> what the one line must say
    "model and models": ({"model": "vit_p4_d6", "models": ["vgg19_bn_w8"]}, "give model .* or models .*, not both"),
    "models: []": ({"models": []}, "models must be a non-empty list of model names"),
    "models: a string": ({"models": "vit_p4_d6"}, "models must be a non-empty list of model names"),
    "models: [resnet99]": ({"models": ["resnet99"]}, "models: unknown model 'resnet99'"),
    "models repeated": ({"models": ["vit_p4_d6", "vit_p4_d6"]}, "models must be distinct"),
    "training for another model": (
        {"training": {"vit_p4_d6": {"epochs": 3}}},
        r"training.vit_p4_d6: not one of the grid's models \(preactresnet18_w8\); add it to models",
    ),
    "a misspelt setting": (
        {"models": ["vit_p4_d6"], "training": {"vit_p4_d6": {"lrr": 0.1}}},
        "training.vit_p4_d6: vit_p4_d6's training has no setting lrr; the settings: epochs, batch_size",
    ),
    "an unknown optimiser": (
        {"models": ["vit_p4_d6"], "training": {"vit_p4_d6": {"optimizer": "adam"}}},
        "training.vit_p4_d6: training settings: optimizer must be one of sgd, adamw",
    ),
    "a bad value": (
        {"models": ["vit_p4_d6"], "training": {"vit_p4_d6": {"epochs": 0}}},
        "training.vit_p4_d6: training settings: epochs must be an integer >= 1",
    ),
    "training not a mapping": ({"training": ["vit_p4_d6"]}, "training must map model names to training settings"),
}


@pytest.mark.parametrize(("make", "message"), BAD_MAKE.values(), ids=BAD_MAKE.keys())
def test_a_bad_model_or_training_entry_is_refused_in_one_line_naming_the_key(tmp_path, make, message):
    with pytest.raises(FireDefenseError, match=f"g.yaml: make: {message}") as error:
        _make(tmp_path, make)
    assert "\n" not in str(error.value)

"""Our narrow VGG-19-BN and small ViT: they take 28 and 32 pixel images, rebuild from their names, and FIRE
finds their stages and repairs a backdoor in them with its automatic layer choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fire_adapters import create_model, load_model_state, with_normalization
from fire_adapters.preprocess import InputNormalization
from fire_defense import FIRE, candidate_layers
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

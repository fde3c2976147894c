"""The model zoo: BackdoorBench-compatible state dicts, no downloads, timm models, grey inputs."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torchvision
from torch import nn

from fire_adapters import create_model, list_models, load_model_state, model_input_channels, with_normalization
from fire_defense import FireDefenseError, UnknownNameError

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def backdoorbench_preactresnet18_keys(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """The state dict of BackdoorBench's PreActResNet18, in registration order, from its definition.

    models/preact_resnet.py: conv1 (3x3, 3->64, no bias); layer1..layer4 of two PreActBlocks with
    64/128/256/512 planes (stride 2 first in layers 2-4); a block registers bn1, conv1, bn2, conv2,
    then shortcut = Sequential(conv1x1) when stride != 1 or the channel count changes; linear(512, classes).
    """

    def bn(prefix, channels):
        return [(f"{prefix}.{k}", () if k == "num_batches_tracked" else (channels,)) for k in BN_KEYS]

    keys = [("conv1.weight", (64, 3, 3, 3))]
    in_planes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            prefix = f"layer{stage}.{block}"
            keys += bn(f"{prefix}.bn1", in_planes)
            keys.append((f"{prefix}.conv1.weight", (planes, in_planes, 3, 3)))
            keys += bn(f"{prefix}.bn2", planes)
            keys.append((f"{prefix}.conv2.weight", (planes, planes, 3, 3)))
            if stride != 1 or in_planes != planes:
                keys.append((f"{prefix}.shortcut.0.weight", (planes, in_planes, 1, 1)))
            in_planes = planes
    return [*keys, ("linear.weight", (num_classes, 512)), ("linear.bias", (num_classes,))]


@pytest.mark.parametrize("num_classes", [10, 43, 200])
def test_preactresnet18_state_dict_is_backdoorbench_key_for_key(num_classes):
    state = create_model("preactresnet18", num_classes).state_dict()
    assert [(k, tuple(v.shape)) for k, v in state.items()] == backdoorbench_preactresnet18_keys(num_classes)


# What BackdoorBench's generate_cls_model gives for these names (torchvision constructors with num_classes;
# ViTs wrapped as Sequential(Resize(224), vit) with heads.head replaced): one telling head key each.
HEADS = {
    "resnet18": ("fc.weight", (512,)),
    "resnet50": ("fc.weight", (2048,)),
    "vgg19_bn": ("classifier.6.weight", (4096,)),
    "vgg19_bn_w8": ("classifier.6.weight", (512,)),  # ours: 4096 / 8 hidden units on 64 pooled features
    "densenet121": ("classifier.weight", (1024,)),
    "mobilenet_v3_large": ("classifier.3.weight", (1280,)),
    "efficientnet_b0": ("classifier.1.weight", (1280,)),
    "googlenet": ("aux1.fc2.weight", (1024,)),
    "inception_v3": ("AuxLogits.fc.weight", (768,)),
    "convnext_tiny": ("classifier.2.weight", (768,)),
    "vit_b_16": ("1.heads.head.weight", (768,)),
    "vit_l_32": ("1.heads.head.weight", (1024,)),
    "vit_p4_d6": ("head.weight", (64,)),  # ours: embedding 64
}


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_builds_with_backdoorbench_keys(name):
    with torch.device("meta"):  # shapes only: no memory, no time
        state = create_model(name, num_classes=7).state_dict()
        if name == "vgg19_bn_w8":  # ours: vgg19_bn's layers and key names, narrower, with a smaller head
            expected = list(torchvision.models.vgg19_bn(weights=None, num_classes=7).state_dict())
        elif name == "vit_p4_d6":  # ours: timm's ViT layout (a ViT-Tiny's keys, six blocks deep)
            reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).state_dict()
            expected = [k for k in reference if not re.match(r"blocks\.([6-9]|1\d)\.", k)]
        elif name.startswith("vit_"):
            reference = getattr(torchvision.models, name)(weights=None)
            reference.heads.head = nn.Linear(reference.heads.head.in_features, 7)  # BackdoorBench's replacement
            expected = [f"1.{k}" for k in reference.state_dict()]  # Sequential(Resize(224), vit)
        elif name.startswith("preactresnet18"):  # tested key for key above; narrow ones keep the key names
            expected = [key for key, _ in backdoorbench_preactresnet18_keys(7)]
        else:
            expected = list(getattr(torchvision.models, name)(weights=None, num_classes=7).state_dict())
    assert list(state) == expected
    if name in HEADS:
        key, fan_in = HEADS[name]
        assert tuple(state[key].shape) == (7, *fan_in)


def test_no_weights_are_downloaded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("create_model tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", refuse)
    with torch.device("meta"):
        for name in ("vit_b_16", "convnext_tiny", "vgg19_bn", "preactresnet18", "timm:resnet18", "vit_p4_d6"):
            create_model(name, num_classes=10)


def test_vit_accepts_small_images():
    model = create_model("vit_b_32", num_classes=10).eval()
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_timm_models_by_prefix():
    model = create_model("timm:resnet18", num_classes=5, in_chans=1)
    assert model.get_classifier().out_features == 5 and model_input_channels(model) == 1


def test_unknown_names_list_what_is_known():
    with pytest.raises(UnknownNameError, match=r"unknown model 'preactresnet19'.*'preactresnet18'.*timm:"):
        create_model("preactresnet19", 10)
    with pytest.raises(UnknownNameError, match=r"unknown timm model 'resnet181'.*resnet18"):
        create_model("timm:resnet181", 10)
    with pytest.raises(FireDefenseError, match="num_classes must be a positive integer"):
        create_model("resnet18", 0)


def test_none_kwargs_do_not_override_defaults():
    model = create_model("preactresnet18", 10, width=None)
    assert model.conv1.out_channels == 64


def test_load_model_state_strips_wrapper_prefixes():
    source = create_model("preactresnet18", 10, width=8)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    target = load_model_state(create_model("preactresnet18", 10, width=8), wrapped)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_load_model_state_names_what_does_not_fit():
    state = create_model("preactresnet18", 43, width=8).state_dict()
    with pytest.raises(FireDefenseError, match=r"linear.weight \(43, 64\) vs \(10, 64\).*num_classes"):
        load_model_state(create_model("preactresnet18", 10, width=8), state, source="the file")
    state.pop("conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(FireDefenseError, match=r"missing: conv1\.weight.*unexpected: extra\.weight"):
        load_model_state(create_model("preactresnet18", 43, width=8), state)


def test_grey_images_are_repeated_into_a_three_channel_stem():
    model = create_model("preactresnet18", 10, width=8).eval()
    classifier = with_normalization(model, "fashionmnist").eval()
    grey = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        expected = model(((grey - 0.5) / 0.5).repeat(1, 3, 1, 1))
        torch.testing.assert_close(classifier(grey), expected)
    with pytest.raises(FireDefenseError, match=r"expected images \(N, 1, H, W\)"):
        classifier(torch.rand(4, 3, 28, 28))


def test_grey_images_go_straight_into_a_one_channel_timm_model():
    model = create_model("timm:resnet18", 10, in_chans=1).eval()
    classifier = with_normalization(model, "mnist").eval()
    grey = torch.rand(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(classifier(grey), model((grey - 0.5) / 0.5))


def test_normalization_follows_the_model_to_its_device_and_adds_no_state():
    classifier = with_normalization(create_model("preactresnet18", 10, width=8), "cifar10")
    assert set(classifier.state_dict()) == {f"1.{k}" for k in classifier[1].state_dict()}
    assert classifier.to(torch.float64)[0].mean.dtype == torch.float64

"""The model zoo: BackdoorBench's model names, plus any timm model as ``timm:<name>``.

Networks of our own for CPU budgets carry names BackdoorBench does not use: ``preactresnet18_w{8,16,32}``,
``vgg19_bn_w8`` (:mod:`fire_adapters.models.vgg`) and ``vit_p4_d6`` (:mod:`fire_adapters.models.vit`).

A model may declare its recommended training in :data:`TRAINING` (``TrainConfig`` settings, as data):
the record factory trains it so unless a recipe says otherwise (``training_recipe(name)``).

``create_model(name, num_classes)`` builds the network BackdoorBench's
``generate_cls_model`` builds for that name, with the same ``state_dict`` keys and
shapes, but never downloads weights (a record's state dict overwrites them anyway).

Grey (1-channel) data: BackdoorBench's networks keep their 3-channel stem, so their
state dicts stay compatible; the grey channel is repeated to three by
:class:`fire_adapters.preprocess.InputNormalization` in front of the model. A timm
model may instead be built with ``in_chans=1``, which that class detects.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torchvision
from torch import nn

from fire_adapters.models.preact_resnet import PreActResNet
from fire_adapters.models.vgg import VGG
from fire_adapters.models.vit import small_vit
from fire_defense import FireDefenseError, Registry, UnknownNameError, drop_none

__all__ = ["MODELS", "TIMM_PREFIX", "TRAINING", "create_model", "list_models", "load_model_state", "training_recipe"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
TIMM_PREFIX = "timm:"

# Names BackdoorBench's generate_cls_model builds by calling torchvision's constructor with num_classes.
TORCHVISION_NAMES = (
    "alexnet",
    "densenet121",
    "densenet161",
    "efficientnet_b0",
    "efficientnet_b3",
    "googlenet",
    "inception_v3",
    "mnasnet1_0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "shufflenet_v2_x1_0",
    "squeezenet1_0",
    "vgg11",
    "vgg16",
    "vgg19",
    "vgg19_bn",
    "wide_resnet50_2",
    "convnext_tiny",
)
# BackdoorBench wraps these as Sequential(Resize((224, 224)), vit) so any input size works.
VIT_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32")


@MODELS.register("preactresnet18")
def preactresnet18(num_classes: int, **kwargs: Any) -> nn.Module:
    """BackdoorBench's PreAct-ResNet-18 (width 64, 3-channel stem)."""
    return PreActResNet((2, 2, 2, 2), num_classes=num_classes, **kwargs)


# Narrower PreAct-ResNet-18s for CPU budgets. Ours, not BackdoorBench's: it cannot build them, so they
# carry names of their own (a record of one says so, rather than pretending to be `preactresnet18`).
NARROW_PREACT_WIDTHS = (8, 16, 32)
for _width in NARROW_PREACT_WIDTHS:
    MODELS.add(f"preactresnet18_w{_width}", partial(PreActResNet, (2, 2, 2, 2), width=_width))

# Two more families for CPU budgets, ours as well: a VGG-19-BN at 1/8 width with a head for 28-32 px
# images (models/vgg.py says how it differs from BackdoorBench's vgg19_bn), and a small timm ViT
# (patch 4, embedding 64, depth 6, 4 heads) that takes 28 and 32 px images alike (models/vit.py).
MODELS.add("vgg19_bn_w8", partial(VGG, width_divisor=8))
MODELS.add("vit_p4_d6", small_vit)

# A model's recommended training: fire_adapters.training.TrainConfig settings over its defaults (SGD with
# Nesterov, one-cycle peak lr 0.2, 4 epochs), for models that do not learn under those. The record factory
# uses them unless a recipe gives its own TrainConfig; a grid's `make: training` overrides them per model.
TRAINING: dict[str, Mapping[str, Any]] = {
    # SGD leaves the ViT at 73% clean accuracy and no backdoor after 4 epochs on Fashion-MNIST (docs/benchmark.md).
    "vit_p4_d6": {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "epochs": 2},
}


def _torchvision(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)


def _torchvision_vit(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    vit = _torchvision(name, num_classes, **kwargs)
    return nn.Sequential(torchvision.transforms.Resize((224, 224), antialias=True), vit)


for _name in TORCHVISION_NAMES:
    MODELS.add(_name, partial(_torchvision, _name))
for _name in VIT_NAMES:
    MODELS.add(_name, partial(_torchvision_vit, _name))


def training_recipe(name: str) -> dict[str, Any]:
    """The ``TrainConfig`` settings model ``name`` trains with beyond the defaults (``{}``: the defaults)."""
    return dict(TRAINING.get(name, {}))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names, sorted (any timm model is available too as ``timm:<name>``)."""
    return MODELS.names(pattern)


def _create_timm(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close timm names: {', '.join(close)}." if close else " See timm.list_models()."
        raise UnknownNameError(f"unknown timm model {name!r}.{hint}")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a classifier by name, without downloading any weights.

    Args:
        name: A BackdoorBench zoo name (see :func:`list_models`) or ``timm:<timm model name>``.
        num_classes: Output classes.
        **kwargs: Passed to the constructor; ``None`` values are dropped.

    Raises:
        UnknownNameError: no such model; the message lists the known names.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise FireDefenseError(f"num_classes must be a positive integer, got {num_classes!r}.")
    kwargs = drop_none(kwargs)
    if name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX) :], num_classes, **kwargs)
    if name not in MODELS:
        raise UnknownNameError(MODELS.unknown_message(name) + f" Any timm model works as '{TIMM_PREFIX}<name>'.")
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> nn.Module:
    """Load ``state_dict`` strictly into ``model``, after removing ``module.``/``_orig_mod.`` prefixes.

    Raises:
        FireDefenseError: keys are missing or unexpected, or shapes differ; the message names them.
    """
    if not isinstance(state_dict, Mapping):
        raise FireDefenseError(f"{source} holds a {type(state_dict).__name__} where a state dict was expected.")
    state = {_strip_prefixes(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", mismatched))
        if items
    ]
    if problems:
        raise FireDefenseError(
            f"{source} does not fit the model built for it ({'; '.join(problems)}); "
            "check its model_name and num_classes."
        )
    model.load_state_dict(state, strict=True)
    return model

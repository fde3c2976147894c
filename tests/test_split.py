"""The model after a layer (fire_defense.split): the second pass of FIRE's target condition resumes there."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fire_adapters.models import create_model
from fire_adapters.preprocess import with_normalization
from fire_defense import FIRE
from fire_defense.fire import RepairedModel
from fire_defense.split import split_at

from helpers import ForwardCounter, patch, tiny_backdoored_model


def output_of(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    stored = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, out: stored.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    return stored[0]


@pytest.mark.parametrize("layer", ["1.layer1", "1.layer2", "1.layer3", "1.layer4"])
def test_the_rest_of_a_preact_resnet_after_each_stage_gives_its_logits(layer):
    torch.manual_seed(0)
    model = with_normalization(create_model("preactresnet18_w8", num_classes=10), "fashionmnist").eval()
    x = torch.rand(4, 1, 28, 28)
    start, _, rest = split_at(model, [layer])
    with torch.inference_mode():
        torch.testing.assert_close(rest(output_of(model, layer, x)), model(x))
    assert start == layer
    assert rest.get_submodule("1.linear") is model.get_submodule("1.linear")  # shared, not copied


def test_the_rest_starts_at_the_first_layer_the_model_computes_and_fires_the_later_layers_hooks():
    torch.manual_seed(0)
    model = tiny_backdoored_model().model
    start, _, rest = split_at(model, ["layer3", "layer2"])
    assert start == "layer2"
    x = torch.rand(3, 1, 16, 16)
    with torch.inference_mode():
        logits, activation = model(x), output_of(model, "layer2", x)
        seen = []
        handle = model.layer3.register_forward_hook(lambda module, args, out: seen.append(len(out)))
        torch.testing.assert_close(rest(activation), logits)
    handle.remove()
    assert seen == [3]  # the later layer's hook fired in the rest


class UsesItsInputLater(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + x)


class CallsItsLayerTwice(UsesItsInputLater):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(self.a(x)))


class DoesNotTrace(UsesItsInputLater):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else -self.b(h)  # control flow on a value: fx cannot trace it


@pytest.mark.parametrize("model", [UsesItsInputLater(), CallsItsLayerTwice(), DoesNotTrace()], ids=type)
def test_no_rest_where_the_model_cannot_be_cut_at_the_layer(model):
    assert split_at(model, ["a"]) is None


def test_fires_second_pass_resumes_after_the_repaired_layer_and_matches_the_whole_pass():
    tiny = tiny_backdoored_model()
    fire = FIRE(tiny.model, layers="layer2", mode="shift", condition="target").fit(tiny.reference, trigger=patch)
    module = fire.module()
    assert module.resume is not None and module.resume[0] == "layer2"
    whole = RepairedModel(tiny.model, dict(zip(module.layers, module.repairs, strict=True)), module.condition)
    x = torch.cat([tiny.test_x[:20], tiny.poisoned_x[:20]])
    counter = ForwardCounter(tiny.model)
    with torch.inference_mode():
        resumed = module(x)
        assert len(counter.inputs) == 1 and counter.count > len(x)  # a second pass, from layer2 onward
        torch.testing.assert_close(resumed, whole(x))
        torch.testing.assert_close(copy.deepcopy(module).double()(x.double()).float(), resumed)
    counter.remove()
    assert not any(name.startswith("resume") for name in module.state_dict())  # the model's weights held once


def test_a_hook_the_cut_would_skip_keeps_fire_on_the_whole_model():
    from fire_defense.split import hooks_on_path

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)).eval()
    _, head, rest = split_at(model, ["0.1"])
    calls: list[str] = []
    handle = model[0].register_forward_hook(lambda *_: calls.append("block"))  # the trace inlines model[0]
    rest(head(torch.randn(3, 4)))
    assert calls == [] and hooks_on_path(model, ["0.1"])  # the cut skips it, and says so
    handle.remove()
    assert not hooks_on_path(model, ["0.1"])
    layer_hook = model[0][1].register_forward_hook(lambda *_: calls.append("layer"))  # the layer's own: called
    assert not hooks_on_path(model, ["0.1"])
    rest(head(torch.randn(3, 4)))
    assert calls == ["layer"]
    layer_hook.remove()
    # FIRE's repaired forward falls back to the hooked whole pass, so the block's hook sees its call
    x, poisoned = torch.randn(64, 4), torch.randn(8, 4) + 3
    fire = FIRE(model, layers=["0.1"]).fit(x, poisoned=poisoned)
    expected = fire(x)
    model[0].register_forward_hook(lambda *_: calls.append("block"))
    assert torch.equal(fire(x), expected) and "block" in calls

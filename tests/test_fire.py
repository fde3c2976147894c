"""FIRE pinned by what the method must do, not by how the code does it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fire_defense import FIRE, MODES, FireDefenseError, NotFittedError, candidate_layers
from fire_defense.metrics import predict

from helpers import ForwardCounter, tiny_backdoored_model

# --- a synthetic model whose backdoor is a known vector at a known layer -----------------------------------------

D_IN, D_HIDDEN, CLASSES, BACKDOOR_UNIT = 24, 16, 4, 15


class Synthetic(nn.Module):
    """``encoder`` copies inputs to hidden units; the head reads classes from units 0..3, and unit 15 is the
    backdoor feature that votes strongly for class 0. The trigger adds 1 to input 15, i.e. the vector e_15
    at the encoder's output."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(D_IN, D_HIDDEN)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(D_HIDDEN, CLASSES))
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.encoder.bias.zero_()
            self.encoder.weight[torch.arange(D_HIDDEN), torch.arange(D_HIDDEN)] = 1.0
            self.head[1].weight.zero_()
            self.head[1].bias.zero_()
            self.head[1].weight[torch.arange(CLASSES), torch.arange(CLASSES)] = 1.0
            self.head[1].weight[0, BACKDOOR_UNIT] = 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


TRUE_DIRECTION = torch.zeros(D_HIDDEN)
TRUE_DIRECTION[BACKDOOR_UNIT] = 1.0


def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    x = torch.rand(n, D_IN, generator=generator) * 0.5
    x[torch.arange(n), labels] += 1.0
    x[:, BACKDOOR_UNIT - 1 : BACKDOOR_UNIT + 1] = 0.0  # units 14, 15: silent on clean data
    return x, labels


def trigger(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, BACKDOOR_UNIT] += 1.0
    return out


@pytest.fixture
def synthetic():
    model = Synthetic().eval()
    clean, _ = synthetic_data(500, seed=0)
    test, labels = synthetic_data(400, seed=1)
    assert (model(test).argmax(1) == labels).all() and (model(trigger(test)).argmax(1) == 0).all()
    return model, clean, test, labels


@pytest.mark.parametrize("mode", MODES)
def test_paired_recovers_the_known_direction_and_restores_predictions(synthetic, mode):
    model, clean, test, labels = synthetic
    fire = FIRE(model, layers="encoder", mode=mode).fit(clean, trigger=trigger)
    beta = fire.directions_["encoder"]
    assert F.cosine_similarity(beta, TRUE_DIRECTION, dim=0) >= 0.99
    with torch.inference_mode():
        assert (fire(trigger(test)).argmax(1) == labels).all()  # poisoned inputs back to the clean prediction
        assert (fire(test).argmax(1) == labels).all()


def test_unpaired_finds_the_direction_from_poisoned_inputs_alone(synthetic):
    model, clean, test, labels = synthetic
    seen, _ = synthetic_data(2000, seed=2)
    fire = FIRE(model, layers="encoder", mode="gate").fit(clean, poisoned=trigger(seen))
    assert F.cosine_similarity(fire.directions_["encoder"], TRUE_DIRECTION, dim=0) >= 0.99
    with torch.inference_mode():
        assert (fire(trigger(test)).argmax(1) == labels).float().mean() >= 0.99


def test_paired_unpaired_and_streaming_agree(synthetic):
    model, clean, _, _ = synthetic
    poisoned = trigger(synthetic_data(300, seed=3)[0])
    unpaired = FIRE(model, layers="encoder").fit(clean, poisoned=poisoned)
    streaming = FIRE(model, layers="encoder").partial_fit(clean=clean)
    for start in range(0, 300, 7):  # uneven batches, one update at a time
        streaming.partial_fit(poisoned=poisoned[start : start + 7])
    torch.testing.assert_close(streaming.directions_["encoder"], unpaired.directions_["encoder"], rtol=0, atol=1e-6)
    paired = FIRE(model, layers="encoder").fit(clean, trigger=trigger)
    assert F.cosine_similarity(paired.directions_["encoder"], unpaired.directions_["encoder"], dim=0) > 0.95


def test_attached_hooks_follow_streaming_updates(synthetic):
    model, clean, test, labels = synthetic
    fire = FIRE(model, layers="encoder", mode="shift", condition=None).partial_fit(clean=clean)
    fire.partial_fit(poisoned=trigger(test[:1]) + 5.0)  # a first, misleading estimate
    with torch.inference_mode(), fire.attached():
        misled = model(trigger(test)).argmax(1)
        fire.partial_fit(poisoned=trigger(synthetic_data(2000, seed=9)[0]))  # more data while attached
        repaired = model(trigger(test)).argmax(1)
    assert (repaired == labels).float().mean() > (misled == labels).float().mean()
    assert (repaired == labels).float().mean() >= 0.99


def test_streaming_equals_unpaired_across_cascaded_layers_without_cascade(synthetic):
    model, clean, _, _ = synthetic
    poisoned = trigger(synthetic_data(64, seed=4)[0])
    layers = ["encoder", "head.0"]
    batch = FIRE(model, layers=layers, cascade=False).fit(clean, poisoned=poisoned)
    stream = FIRE(model, layers=layers, cascade=False).partial_fit(clean=clean)
    for sample in poisoned.split(1):
        stream.partial_fit(poisoned=sample)
    for layer in layers:
        torch.testing.assert_close(stream.directions_[layer], batch.directions_[layer], rtol=0, atol=1e-6)


def test_cascade_estimates_later_layers_from_repaired_activations(synthetic):
    model, clean, _, _ = synthetic
    fire = FIRE(model, layers=["encoder", "head.0"], mode="shift").fit(clean, trigger=trigger)
    assert fire.directions_["head.0"].abs().max() < 1e-6  # the shift at encoder already removed the trigger
    plain = FIRE(model, layers=["encoder", "head.0"], mode="shift", cascade=False).fit(clean, trigger=trigger)
    assert plain.directions_["head.0"][BACKDOOR_UNIT] > 0.9


def test_gate_false_positive_rate_on_clean_data_is_within_target(synthetic):
    model, _, _, _ = synthetic
    reference, _ = synthetic_data(2000, seed=5)
    fresh, _ = synthetic_data(4000, seed=6)
    fire = FIRE(model, layers="encoder", mode="gate", fpr=0.05).fit(reference, trigger=trigger)
    flagged = fire.detect(fresh).float().mean()
    assert flagged <= 0.05 + 3 * (0.05 * 0.95 / 4000) ** 0.5 + 0.01  # target, sampling error, quantile estimate
    assert fire.detect(trigger(fresh)).float().mean() >= 0.99
    scores = fire.scores(trigger(fresh[:10]))["encoder"]
    assert scores.shape == (10,) and (scores > fire.thresholds_["encoder"]).all()


def test_project_removes_only_what_exceeds_clean(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode="project", fpr=0.01).fit(clean, trigger=trigger)
    with torch.inference_mode():
        torch.testing.assert_close(fire(test), model(test))  # clean activations have no excess along beta


def test_low_rank_directions_span_a_two_dimensional_trigger(synthetic):
    model, clean, test, labels = synthetic

    def two_way_trigger(x: torch.Tensor) -> torch.Tensor:  # the trigger moves unit 15 or unit 14, at random
        out = x.clone()
        pick = torch.arange(len(x)) % 2
        out[torch.arange(len(x)), 14 + pick] += 1.0
        return out

    with torch.no_grad():
        model.head[1].weight[0, 14] = 10.0
    fire = FIRE(model, layers="encoder", mode="project", rank=2).fit(clean, trigger=two_way_trigger)
    basis = fire.stats_["encoder"].basis.float()
    assert basis.shape == (2, D_HIDDEN)
    assert basis[:, 14:16].norm(dim=1).min() > 0.99  # both directions lie in the span of units 14 and 15
    with torch.inference_mode():
        assert (fire(two_way_trigger(test)).argmax(1) == labels).all()


def test_batch_size_invariance_and_inference_mode(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode="gate").fit(clean, trigger=trigger)
    mixed = torch.cat([test[:8], trigger(test[8:16])])
    with torch.inference_mode():
        together = fire(mixed)
        alone = torch.cat([fire(x[None]) for x in mixed])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("mode", MODES)
def test_the_repaired_pass_can_be_differentiated(synthetic, mode):
    """Adaptive attacks need gradients through the defense; statistics fitted in inference mode must not block them."""
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode=mode).fit(clean, trigger=trigger)
    x = trigger(test[:4]).requires_grad_(True)
    fire(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_hooks_are_gone_after_the_block_even_after_an_exception(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers=["encoder", "head.0"], condition=None).fit(clean, trigger=trigger)
    counts = [len(m._forward_hooks) for m in model.modules()]
    with fire.attached():
        assert sum(len(m._forward_hooks) for m in model.modules()) == sum(counts) + 2
    with pytest.raises(RuntimeError, match="boom"), fire.attached():
        raise RuntimeError("boom")
    fire(test)
    fire.scores(test)
    handles = fire.attach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == sum(counts) + 2
    handles.remove()
    handles.remove()  # harmless twice
    assert [len(m._forward_hooks) for m in model.modules()] == counts


def test_other_hooks_on_the_model_are_left_alone(synthetic):
    model, clean, test, _ = synthetic
    calls = []
    handle = model.encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    fire = FIRE(model, layers="encoder").fit(clean, trigger=trigger)
    fire(test)
    assert len(model.encoder._forward_hooks) == 1
    handle.remove()


def test_state_dict_round_trip_through_a_safe_file(synthetic, tmp_path):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode="gate").fit(clean, trigger=trigger)
    fire.save(tmp_path / "fire.pt")
    loaded = FIRE(model).load(tmp_path / "fire.pt")
    assert loaded.mode == "gate" and loaded.layers_ == ["encoder"]
    with torch.inference_mode():
        torch.testing.assert_close(loaded(trigger(test)), fire(trigger(test)))
    loaded.partial_fit(poisoned=trigger(test[:5]))  # a loaded FIRE keeps streaming

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"config": Exploit()}, tmp_path / "bad.pt")
    with pytest.raises(FireDefenseError, match="not a FIRE state file that loads safely"):
        FIRE(model).load(tmp_path / "bad.pt")


def test_state_keeps_alpha_and_bad_state_changes_nothing(synthetic, tmp_path):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", alpha=0.3).fit(clean, trigger=trigger)
    fire.save(tmp_path / "fire.pt")
    loaded = FIRE(model).load(tmp_path / "fire.pt")
    assert loaded.alpha == 0.3
    with torch.inference_mode():
        torch.testing.assert_close(loaded(trigger(test)), fire(trigger(test)))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(FireDefenseError, match="not a FIRE state file that loads safely"):
        loaded.load(tmp_path / "empty.pt")
    state = fire.state_dict()
    for broken in ({**state, "config": {**state["config"], "fpr": "high"}}, {**state, "layers": []}, {"config": 1}):
        with pytest.raises(FireDefenseError):
            loaded.load_state_dict(broken)
        assert loaded.fpr == fire.fpr and loaded.alpha == 0.3 and loaded.layers_ == ["encoder"]


def test_attached_hooks_block_refitting_and_folding_until_removed(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode="shift", condition=None).fit(clean, trigger=trigger)
    handles = fire.attach()
    with pytest.raises(FireDefenseError, match=r"remove them before fit\(\)"):
        fire.fit(clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match=r"remove them before fold\(\)"):
        fire.fold(test[:4])
    handles.remove()
    fire.fit(clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match="rank > 1 needs all paired differences at once"):
        FIRE(model, layers="encoder", mode="project", rank=2).partial_fit(clean=clean)
    with pytest.raises(FireDefenseError, match="not both"):
        fire.partial_fit(clean=clean, poisoned=trigger(clean), trigger=trigger)


def test_device_and_dtype_follow_the_model(synthetic):
    model, clean, test, labels = synthetic
    model = model.double()
    fire = FIRE(model, layers="encoder").fit(clean.double(), trigger=trigger)
    with torch.inference_mode():
        out = fire(trigger(test.double()))
    assert out.dtype == torch.float64 and (out.argmax(1) == labels).all()


def test_works_under_torch_compile(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", mode="gate").fit(clean, trigger=trigger)
    compiled = torch.compile(fire.module(), backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(trigger(test)), fire(trigger(test)))


def test_clear_errors_on_misuse(synthetic):
    model, clean, test, _ = synthetic
    with pytest.raises(NotFittedError, match="not fitted"):
        FIRE(model, layers="encoder")(test)
    with pytest.raises(FireDefenseError, match=r"no layer 'encodr'\. Did you mean 'encoder'"):
        FIRE(model, layers="encodr").fit(clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match="unknown mode 'clip'"):
        FIRE(model, layers="encoder", mode="clip").fit(clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match="clean set is empty"):
        FIRE(model, layers="encoder").fit(clean[:0], trigger=trigger)
    with pytest.raises(FireDefenseError, match="poisoned inputs or a trigger, not both"):
        FIRE(model, layers="encoder").fit(clean, poisoned=clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match="rank > 1 needs paired data"):
        FIRE(model, layers="encoder", mode="project", rank=2).fit(clean, poisoned=trigger(clean))
    with pytest.raises(FireDefenseError, match="no stage layers recognised"):
        FIRE(model).fit(clean, trigger=trigger)
    with pytest.raises(FireDefenseError, match="training mode"):
        FIRE(model.train(), layers="encoder").fit(clean, trigger=trigger)
    model.eval()
    with pytest.raises(NotFittedError, match="no poisoned samples seen"):
        FIRE(model, layers="encoder").partial_fit(clean=clean)(test)


def test_fold_equals_the_hooked_shift_and_exports():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    images = torch.rand(64, 3, 8, 8)
    fire = FIRE(model, layers="3", mode="shift", condition=None).fit(images, poisoned=images + 0.3)
    folded = fire.fold(images[:8])
    assert sum(len(m._forward_hooks) for m in folded.modules()) == 0
    test = torch.rand(16, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(folded(test), fire(test), rtol=1e-5, atol=1e-5)
    exported = torch.export.export(folded, (test,))
    torch.testing.assert_close(exported.module()(test), fire(test), rtol=1e-5, atol=1e-5)
    early = FIRE(model, layers="1", mode="shift", condition=None).fit(images, poisoned=images + 0.3)
    with pytest.raises(FireDefenseError, match=r"cannot be folded|varies over positions"):
        early.fold(images[:8])
    with pytest.raises(FireDefenseError, match="single-layer 'shift'"):
        FIRE(model, layers="3", mode="gate", condition=None).fit(images, poisoned=images + 0.3).fold(images[:8])


# --- architectures: where automatic layer choice looks -------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        ("preactresnet18", ["layer1", "layer2", "layer3", "layer4"]),
        ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
        ("vgg11", ["features.2", "features.5", "features.10", "features.15", "features.20"]),
        ("vit_b_32", [f"1.encoder.layers.encoder_layer_{i}" for i in range(12)]),
        ("timm:resnet18", ["layer1", "layer2", "layer3", "layer4"]),
        ("timm:vit_tiny_patch16_224", [f"blocks.{i}" for i in range(12)]),
        ("timm:convnext_atto", [f"stages.{i}" for i in range(4)]),
    ],
)
def test_candidate_layers_on_resnets_vggs_and_vits(build, expected):
    from fire_adapters import create_model

    with torch.device("meta"):
        model = create_model(build, num_classes=10)
    assert candidate_layers(model) == expected


# --- a real, small backdoored model trained here ------------------------------------------------------------


@pytest.fixture(scope="module")
def backdoored():
    return tiny_backdoored_model()


@pytest.mark.parametrize("mode", MODES)
def test_a_real_backdoor_is_repaired_from_ten_poisoned_inputs(backdoored, mode):
    model, reference, seen, test_x, test_y, poisoned_x, poisoned_y = backdoored
    clean_acc = (predict(model, test_x) == test_y.numpy()).mean()
    asr = (predict(model, poisoned_x) == 0).mean()
    assert clean_acc > 0.95 and asr > 0.9  # the backdoor works
    fire = FIRE(model, layers="auto", mode=mode).fit(reference, poisoned=seen)
    repaired_asr = (predict(fire, poisoned_x) == 0).mean()
    repaired_acc = (predict(fire, test_x) == test_y.numpy()).mean()
    poisoned_acc = (predict(fire, poisoned_x) == poisoned_y.numpy()).mean()
    assert repaired_asr < 0.15 and poisoned_acc > 0.8
    # shift and match move every input, clean ones too; project and gate leave them (almost) alone
    assert repaired_acc > clean_acc - (0.1 if mode in ("shift", "match") else 0.01)
    assert fire.layers_[0] in ("layer1", "layer2", "layer3")
    scores = fire.layer_scores_
    assert set(scores) == {"layer1", "layer2", "layer3"}
    assert all(np.isfinite(list(v.values())).all() for v in scores.values())


# --- the pieces FIRE is made of: statistics, repair modules, a layer choice that changes nothing ----------------


def _hyperparameters(fire: FIRE) -> dict:
    return {name: value for name, value in vars(fire).items() if not name.startswith("_") and not name.endswith("_")}


def test_fit_never_changes_hyperparameters_and_starts_from_scratch(backdoored):
    model, reference, seen, *_ = backdoored
    fire = FIRE(model, layers="auto", mode="gate", cascade=True)
    before = _hyperparameters(fire)
    fire.fit(reference, poisoned=seen)
    assert _hyperparameters(fire) == before and hasattr(fire, "layer_scores_")
    fire.layers = fire.layers_[0]  # a user's change of a hyperparameter, then a new fit
    fire.fit(reference, poisoned=seen)
    assert not hasattr(fire, "layer_scores_")  # nothing left over from the automatic choice


def test_layer_choice_is_a_function_that_leaves_statistics_and_model_untouched(backdoored):
    from fire_defense.layers import capture_activations
    from fire_defense.repair import build_repair
    from fire_defense.selection import choose_layer
    from fire_defense.statistics import LayerStatistics

    model, reference, seen, *_ = backdoored
    layers = candidate_layers(model)
    stats: dict[str, LayerStatistics] = {}
    for stream, inputs in (("clean", reference), ("poisoned", seen)):
        capture_activations(
            model,
            [inputs],
            layers,
            lambda layer, x, s=stream: stats.setdefault(layer, LayerStatistics(x.shape[1:], x.dtype, True)).add(s, x),
        )
    sums = {layer: {k: v.clone() for k, v in s.sums.items()} for layer, s in stats.items()}
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    choices = {
        select: choose_layer(
            model, stats, reference, seen, lambda layer, s: build_repair("gate", s, 1.0, 0.01, 1), select
        )
        for select in ("repair", "separation")
    }
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert all(torch.equal(stats[layer].sums[k], sums[layer][k]) for layer in stats for k in sums[layer])
    fitted = FIRE(model, layers="auto", mode="gate", select="repair", condition=None).fit(reference, poisoned=seen)
    assert choices["repair"].layer == fitted.layers_[0] and choices["repair"].scores == fitted.layer_scores_
    assert set(choices["separation"].scores[choices["separation"].layer]) == {"separation"}


def test_repairs_are_modules_that_move_save_and_follow_streaming(synthetic):
    model, clean, test, labels = synthetic
    fire = FIRE(model, layers="encoder", mode="gate").fit(clean)  # no poisoned inputs yet
    with pytest.raises(NotFittedError, match="no poisoned samples seen"):
        fire.module()
    fire.partial_fit(poisoned=trigger(test[:1]) + 5.0)  # a first, misleading estimate
    repaired = fire.module()
    state = repaired.state_dict()
    assert {"repairs.0.offset", "repairs.0.threshold", "model.encoder.weight"} <= set(state)
    misled = (repaired(trigger(test)).argmax(1) == labels).float().mean()
    fire.partial_fit(poisoned=trigger(synthetic_data(500, seed=9)[0]))  # refreshed in place: the module follows
    with torch.inference_mode():
        assert (repaired(trigger(test)).argmax(1) == labels).float().mean() > misled
        torch.testing.assert_close(repaired(trigger(test)), fire(trigger(test)))
    double = copy.deepcopy(repaired).double()
    assert double.repairs[0].offset.dtype == torch.float64
    with torch.inference_mode():
        torch.testing.assert_close(double(trigger(test).double()).float(), fire(trigger(test)))


# --- FIRE v2: the target condition, the held-out layer choice --------------------------------------------------


def test_target_condition_repairs_only_inputs_sent_to_the_target_in_a_second_pass(synthetic):
    model, clean, test, labels = synthetic
    fire = FIRE(model, layers="encoder", mode="shift", condition="target").fit(clean, trigger=trigger)
    assert fire.condition_.targets == [0]
    counter = ForwardCounter(model)
    mixed = torch.cat([test[:20], trigger(test[20:40])])
    with torch.inference_mode():
        out, plain = fire(mixed), model(mixed)
    sent_to_target = plain.argmax(1) == 0
    assert counter.passes[:2] == [40, int(sent_to_target.sum())]  # one pass, then only the selected inputs again
    assert len(counter.inputs) == 2  # (and the plain pass): the second pass resumed after the repaired layer
    torch.testing.assert_close(out[~sent_to_target], plain[~sent_to_target])  # the others are untouched
    assert (out.argmax(1) == torch.cat([labels[:20], labels[20:40]])).all()
    counter.clear()
    with torch.inference_mode():
        fire(test[labels != 0])  # nothing is sent to the target: a single pass
    assert counter.passes == [int((labels != 0).sum())]
    counter.remove()
    with pytest.raises(FireDefenseError, match="second pass that hooks cannot express"):
        fire.attach()


def test_no_single_target_means_every_input_is_repaired(synthetic):
    """An all-to-all attack sends poisoned inputs to many labels: no class reaches target_share, none is assumed."""
    from fire_defense.repair import TargetCondition

    condition = TargetCondition(4, share=0.5, device=torch.device("cpu")).update(torch.tensor([0, 1, 2, 3, 1, 2]))
    assert condition.targets == [0, 1, 2, 3]
    assert condition.update(torch.tensor([2] * 20)).targets == [2]  # a majority emerges as inputs arrive
    model, clean, test, _ = synthetic
    spread = clean[:40] + 0.01  # "poisoned" inputs the model sends to all four labels
    conditional = FIRE(model, layers="encoder", mode="shift", condition="target").fit(clean, poisoned=spread)
    everyone = FIRE(model, layers="encoder", mode="shift", condition=None).fit(clean, poisoned=spread)
    assert conditional.condition_.targets == [0, 1, 2, 3]
    with torch.inference_mode():
        torch.testing.assert_close(conditional(test), everyone(test))


def test_with_every_class_a_target_one_pass_repairs_the_gated_inputs(synthetic):
    model, clean, test, _ = synthetic
    spread = clean[:40] + 0.01
    fire = FIRE(model, layers="encoder", mode="shift", gate_quantiles=(0.5,)).fit(clean, poisoned=spread)
    everyone = FIRE(model, layers="encoder", mode="shift", condition=None).fit(clean, poisoned=spread)
    assert fire.condition_.targets == [0, 1, 2, 3] and fire.gate_quantile_ == 0.5
    threshold = fire.repairs_["encoder"].select_threshold
    with torch.inference_mode():
        above = fire.scores(test)["encoder"] > threshold
        assert 0 < int(above.sum()) < len(test)  # the gate splits the batch
        expected = torch.where(above[:, None], everyone(test), model(test))
        counter = ForwardCounter(model)
        torch.testing.assert_close(fire(test), expected)
    assert counter.passes == [len(test)]  # one pass, no second one
    counter.remove()


def test_streaming_updates_the_targets_and_the_statistics(synthetic):
    model, clean, test, labels = synthetic
    fire = FIRE(model, layers="encoder", mode="match", condition="target").partial_fit(clean=clean)
    stream = trigger(synthetic_data(30, seed=7)[0])
    for sample in stream.split(1):
        fire.partial_fit(poisoned=sample)
    assert int(fire.condition_.counts.sum()) == 30 and fire.condition_.targets == [0]
    batch = FIRE(model, layers="encoder", mode="match", condition="target").fit(clean, poisoned=stream)
    with torch.inference_mode():
        torch.testing.assert_close(fire(trigger(test)), batch(trigger(test)))
        assert (fire(trigger(test)).argmax(1) == labels).all()


def test_the_confidence_weight_counts_each_moved_input_by_its_repaired_probability(backdoored):
    model, reference, seen, *_ = backdoored
    fits = {
        weight: FIRE(model, condition="target", gate_quantiles=(None,), holdout_weight=weight).fit(
            reference, poisoned=seen
        )
        for weight in ("count", "confidence")
    }  # one gate quantile, so each layer's score is of the same repaired inputs under both weights
    counted, weighted = fits["count"].layer_scores_, fits["confidence"].layer_scores_
    for layer in counted:  # each moved input counts a probability (at most 1) instead of 1
        assert 0 < weighted[layer]["moved"] <= counted[layer]["moved"] + 1e-9, layer
        assert weighted[layer]["holdout"] == pytest.approx(weighted[layer]["moved"] - weighted[layer]["disturbed"])
    assert any(weighted[layer]["moved"] < counted[layer]["moved"] - 1e-6 for layer in counted)
    with pytest.raises(FireDefenseError, match="holdout_weight"):
        FIRE(model, holdout_weight="votes").fit(reference, poisoned=seen)


def test_holdout_statistics_leave_out_what_they_score():
    from fire_defense.statistics import LayerStatistics

    clean = torch.randn(50, 3, 4, 4)
    poisoned = torch.randn(5, 3, 4, 4) + 1.0
    stats = LayerStatistics(clean.shape[1:], clean.dtype, keep_poisoned=True)
    stats.add("clean", clean)
    stats.add("poisoned", poisoned)
    held = stats.holdout(40).leave_out(2)
    expected = torch.cat([poisoned[:2], poisoned[3:]]).mean(0) - clean[:40].mean(0)
    torch.testing.assert_close(held.direction.float(), expected.flatten(), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        stats.channel_std("clean").float(), clean.transpose(0, 1).flatten(1).std(1, correction=0)
    )


def test_statistics_of_tokens_and_flat_layers_pool_per_channel():
    from fire_defense.statistics import LayerStatistics

    for shape, axes in (((3, 4, 4), (0, 2, 3)), ((5, 6), (0, 1)), ((7,), (0,))):
        batch = torch.randn(20, *shape) + 2.0
        stats = LayerStatistics(torch.Size(shape), batch.dtype)
        stats.add("clean", batch[:7])
        stats.add("clean", batch[7:])
        exact = batch.double()
        torch.testing.assert_close(stats.channel_sums["clean"], exact.sum(axes))
        torch.testing.assert_close(stats.channel_squares["clean"], exact.square().sum(axes))


def test_projection_scores_are_each_repairs_score():
    from fire_defense.repair import build_repair, projection_scores
    from fire_defense.statistics import LayerStatistics

    stats = LayerStatistics(torch.Size((3, 4, 4)), torch.float32, keep_poisoned=True)
    stats.add("clean", torch.randn(30, 3, 4, 4))
    stats.add("poisoned", torch.randn(4, 3, 4, 4) + 1.0)
    repairs = [build_repair("match", stats.leave_out(i), 1.0, 0.01, 1) for i in range(4)]
    outputs = torch.randn(6, 3, 4, 4)
    expected = torch.stack([repair.score(outputs) for repair in repairs], 1)
    torch.testing.assert_close(projection_scores(repairs, outputs), expected)
    directions = torch.stack([repair.basis_t[:, 0] for repair in repairs], 1)
    torch.testing.assert_close(projection_scores(repairs, products=outputs.flatten(1) @ directions), expected)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # the repairs differ, so the columns must
    known = stats.clean_activations() @ stats.unit_basis().T.float()
    given, computed = build_repair("gate", stats, 1.0, 0.1, 1, known), build_repair("gate", stats, 1.0, 0.1, 1)
    for name, buffer in computed.state_dict().items():
        torch.testing.assert_close(given.state_dict()[name], buffer, msg=name)


def test_holdout_choice_scores_every_candidate_on_held_out_inputs(backdoored):
    model, reference, seen, *_, poisoned_x, poisoned_y = backdoored
    fire = FIRE(model, layers="auto", mode="match", condition="target", select="holdout").fit(reference, poisoned=seen)
    scores = fire.layer_scores_
    assert set(scores) == {"layer1", "layer2", "layer3"}
    for layer, score in scores.items():
        assert score["holdout"] == pytest.approx(score["moved"] - score["disturbed"]), layer
        assert 0 <= score["moved"] <= 1 and 0 <= score["disturbed"] <= 1
    assert scores[fire.layers_[0]]["holdout"] == max(s["holdout"] for s in scores.values())
    assert (predict(fire, poisoned_x) == poisoned_y.numpy()).mean() > 0.8


# --- the default's cost: the first pass as head and rest, the held-out choice from the kept activations -----------


def test_the_first_pass_as_head_and_rest_gives_the_hooked_passes_logits_bit_for_bit(backdoored):
    model, reference, seen, test_x, _, poisoned_x, _ = backdoored
    output_layer = [module for module in model.modules() if next(module.children(), None) is None][-1]
    x, rows = torch.cat([test_x[:60], poisoned_x[:60]]), []
    for quantiles in ((None,), (0.5,)):
        fire = FIRE(model, layers="layer2", gate_quantiles=quantiles).fit(reference, poisoned=seen)
        module, results = fire.module(), {}
        counter = output_layer.register_forward_hook(lambda _, args, out: rows.append(len(out)))
        with torch.inference_mode():
            for path in ("head and rest", "hooked"):
                hook = model.register_forward_pre_hook(lambda *_: None) if path == "hooked" else None
                assert module._split() == (hook is None)  # a hook on the model itself sees every pass, as before
                scores: dict[str, torch.Tensor] = {}
                results[path] = (module(x, scores), scores["layer2"], list(rows))
                rows.clear()
                if hook is not None:
                    hook.remove()
        counter.remove()
        (split, split_scores, split_rows), (hooked, hooked_scores, hooked_rows) = results.values()
        assert torch.equal(split, hooked) and torch.equal(split_scores, hooked_scores), quantiles
        assert split_rows == hooked_rows and split_rows[0] == len(x) and 0 < split_rows[1] < len(x)  # the selected
        assert not torch.equal(split, model(x))  # the second pass repaired some of them


def test_fire_reuses_its_module_and_follows_a_new_fit(synthetic):
    model, clean, test, _ = synthetic
    fire = FIRE(model, layers="encoder", condition="target").fit(clean, trigger=trigger)
    with torch.inference_mode():
        fire(trigger(test))  # the module is made here and kept
        fire.fit(clean, poisoned=trigger(test[:3]) * 2)  # other directions: a new module
        fresh = FIRE(model, layers="encoder", condition="target").fit(clean, poisoned=trigger(test[:3]) * 2)
        assert torch.equal(fire(trigger(test)), fresh(trigger(test)))
        huge = torch.full((1, D_IN), 3e38)  # finite, though its sum is not: accepted
        assert fire(huge).shape == (1, CLASSES)
    with pytest.raises(FireDefenseError, match="NaN or infinite"):
        fire(torch.cat([huge, torch.full((1, D_IN), float("inf"))]))


def test_the_held_out_choice_from_kept_activations_equals_the_one_from_whole_passes(backdoored, monkeypatch):
    from fire_defense.split import rests_after

    model, reference, seen, *_ = backdoored
    rests, activation = rests_after(model, candidate_layers(model)), []  # one trace, a rest after each stage
    with torch.inference_mode():
        for layer, rest in rests.items():
            handle = model.get_submodule(layer).register_forward_hook(lambda _, args, out: activation.append(out))
            logits = model(reference[:8])
            handle.remove()
            assert torch.equal(rest(activation.pop()), logits), layer
    resumed = FIRE(model).fit(reference, poisoned=seen)
    monkeypatch.setattr("fire_defense.selection.rests_after", lambda _, layers: dict.fromkeys(layers))  # no cut
    whole = FIRE(model).fit(reference, poisoned=seen)
    assert (resumed.layers_, resumed.gate_quantile_) == (whole.layers_, whole.gate_quantile_)
    for layer, scores in whole.layer_scores_.items():
        assert resumed.layer_scores_[layer] == pytest.approx(scores, abs=1e-6), layer
    stats = resumed.stats_[resumed.layers_[0]]
    again = FIRE(model, layers=resumed.layers_).fit(reference, poisoned=seen)  # the chosen layer's own statistics
    assert torch.equal(stats.sums["clean"], again.stats_[resumed.layers_[0]].sums["clean"])


def test_held_out_statistics_taken_out_of_the_whole_equal_those_added_afresh():
    from fire_defense.statistics import LayerStatistics

    clean, poisoned = torch.randn(50, 3, 4, 4), torch.randn(5, 3, 4, 4) + 1.0
    whole = LayerStatistics(clean.shape[1:], clean.dtype, keep_poisoned=True)
    for batch in clean.split(16):
        whole.add("clean", batch)
    whole.add("poisoned", poisoned)
    fresh = LayerStatistics(clean.shape[1:], clean.dtype, keep_poisoned=True)
    fresh.add("clean", clean[:40])
    fresh.add("poisoned", poisoned)
    held = whole.holdout(40)  # 10 held out: taken out of the whole
    assert held.counts == fresh.counts and torch.equal(held.clean_activations(), fresh.clean_activations())
    for name in ("sums", "channel_sums", "channel_squares"):
        for stream in ("clean", "poisoned"):
            torch.testing.assert_close(getattr(held, name)[stream], getattr(fresh, name)[stream], rtol=1e-12, atol=1e-9)


def test_a_gate_set_or_cleared_in_place_is_followed_by_the_module(backdoored):
    model, reference, seen, test_x, _, poisoned_x, _ = backdoored
    x = torch.cat([test_x[:60], poisoned_x[:60]])
    gated = FIRE(model, layers="layer2", gate_quantiles=(0.5,)).fit(reference, poisoned=seen)
    ungated = FIRE(model, layers="layer2", gate_quantiles=(None,)).fit(reference, poisoned=seen)
    module = gated.module()
    with torch.inference_mode():
        before = module(x)
        assert not torch.equal(before, ungated(x))  # the gate leaves some selected inputs alone
    threshold = module.repairs[0].select_threshold
    with torch.inference_mode(False), torch.no_grad():
        saved = threshold.clone()
        threshold.fill_(float("-inf"))  # in place, as partial_fit and load_state_dict change it
    with torch.inference_mode():
        assert torch.equal(module(x), ungated(x))
    with torch.inference_mode(False), torch.no_grad():
        threshold.copy_(saved)
    with torch.inference_mode():
        assert torch.equal(module(x), before)

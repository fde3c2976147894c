"""The runtime-defense interface: every registered defense on a small backdoored model, and each mitigation's
defining behaviour. (Detectors' own behaviours are in test_detectors.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fire_bench.defenses import RuntimeDefense, create_defense, list_defenses
from fire_defense import FIRE, FireDefenseError, NotFittedError, UnknownNameError
from fire_defense.metrics import REJECTED, predict

from helpers import ForwardCounter, patch, write_backdoored_record


def reference_labels(tiny) -> torch.Tensor:
    """Stand-in true labels for the reference (helpers.py does not keep them): the accurate tiny model's predictions."""
    with torch.inference_mode():
        return tiny.model(tiny.reference).argmax(1)


def fitted(name: str, tiny, **params) -> RuntimeDefense:
    return create_defense(name, **params).fit(
        tiny.model, tiny.reference, poisoned=tiny.seen, trigger=patch, clean_labels=reference_labels(tiny)
    )


@pytest.mark.parametrize("name", list_defenses())
def test_every_defense_declares_its_true_cost_and_sees_only_the_defenders_data(name, tiny):
    if name == "ibd-psc":
        pytest.skip("IBD-PSC amplifies BatchNorm, which the tiny model lacks; test_detectors.py runs it on one")
    clean_labels = reference_labels(tiny)  # before counting: only the defense's own passes count
    counter = ForwardCounter(tiny.model)
    hooks_before = len(tiny.model._forward_hooks)
    try:
        defense = create_defense(name)
        triggered = []

        def spy_trigger(x: torch.Tensor) -> torch.Tensor:
            triggered.append(x)
            return patch(x)

        defense.fit(tiny.model, tiny.reference, poisoned=tiny.seen, trigger=spy_trigger, clean_labels=clean_labels)
        seen_at_fit = torch.cat(counter.inputs).flatten(1) if counter.inputs else torch.empty(0, 256)
        test_rows = torch.cat([tiny.test_x, tiny.poisoned_x]).flatten(1)
        assert not (torch.cdist(seen_at_fit, test_rows) < 1e-6).any(), "an evaluation input reached the model at fit"
        assert bool(triggered) == ("trigger" in defense.needs)

        counter.clear()
        x = tiny.test_x[:40]
        labels = defense.predict(x)
        if defense.cost_varies:  # declared as measured on the clean reference: exact there, bounded elsewhere
            assert len(x) <= counter.count <= 2 * len(x)
            counter.clear()
            defense.predict(tiny.reference)
            assert counter.count == pytest.approx(defense.forward_passes * len(tiny.reference))
        else:
            assert counter.count == pytest.approx(defense.forward_passes * len(x))
    finally:
        counter.remove()
    assert len(tiny.model._forward_hooks) == hooks_before  # every hook a defense set is gone
    assert labels.shape == (40,) and labels.dtype == torch.int64
    allowed = set(range(10)) | ({REJECTED} if defense.rejects else set())
    assert set(labels.tolist()) <= allowed
    assert defense.source, "cite the paper"
    again = fitted(name, tiny)
    assert torch.equal(labels, again.predict(x))  # seeded: a refit makes the same decisions


def test_interface_errors_are_clear(tiny):
    with pytest.raises(UnknownNameError, match="unknown defense 'strp'"):
        create_defense("strp")
    with pytest.raises(FireDefenseError, match="jpeg"):
        create_defense("jpeg", qualty=50)
    with pytest.raises(FireDefenseError, match="needs trigger"):
        create_defense("correction").fit(tiny.model, tiny.reference)
    with pytest.raises(FireDefenseError, match="needs poisoned"):
        create_defense("fire").fit(tiny.model, tiny.reference)
    with pytest.raises(NotFittedError):
        create_defense("none").predict(tiny.test_x[:2])
    with pytest.raises(FireDefenseError, match="non-empty"):
        create_defense("none").fit(tiny.model, tiny.reference[:0])
    with pytest.raises(FireDefenseError, match="quality"):
        create_defense("jpeg", quality=0).fit(tiny.model, tiny.reference)


def test_fire_behind_the_interface_is_fire(tiny):
    defense = fitted("fire", tiny, mode="gate")
    direct = FIRE(tiny.model, layers="auto", mode="gate").fit(tiny.reference, poisoned=tiny.seen)
    assert np.array_equal(defense.predict(tiny.poisoned_x).numpy(), predict(direct, tiny.poisoned_x))
    scores = defense.score(tiny.poisoned_x)
    assert (scores > 0).float().mean() > 0.8 and (defense.score(tiny.test_x) > 0).float().mean() < 0.05


def test_fire_stream_equals_the_batch_fit_while_its_reservoir_holds_every_input(tiny):
    streamed, batch = fitted("fire-stream", tiny, mode="gate"), fitted("fire", tiny, mode="gate")
    assert len(tiny.seen) <= streamed.reservoir and streamed.layers_ == batch.layers_
    assert streamed.setting_ == batch.setting_ and 1 < streamed.forward_passes < 2  # inputs sent to the target: twice
    assert torch.equal(streamed.predict(tiny.poisoned_x), batch.predict(tiny.poisoned_x))
    torch.testing.assert_close(streamed.score(tiny.test_x), batch.score(tiny.test_x))


def test_fire_stream_chooses_from_its_reservoir_and_repairs_with_the_whole_stream(tiny):
    defense = fitted("fire-stream", tiny, reservoir=2, mode="gate")
    layer, quantile = defense.layers_, defense.fire_.gate_quantile_
    whole = FIRE(tiny.model, layers=layer, mode="gate", gate_quantiles=(quantile,)).partial_fit(clean=tiny.reference)
    whole.partial_fit(poisoned=[x[None] for x in tiny.seen])  # every one of the k inputs, one at a time
    assert np.array_equal(defense.predict(tiny.poisoned_x).numpy(), predict(whole, tiny.poisoned_x))
    assert (defense.predict(tiny.poisoned_x) == 0).float().mean() < 0.2  # it repairs
    again = fitted("fire-stream", tiny, reservoir=2, mode="gate")
    assert again.setting_ == defense.setting_  # the reservoir's sample is seeded
    with pytest.raises(FireDefenseError, match="reservoir must be an integer >= 1"):
        fitted("fire-stream", tiny, reservoir=0)


def test_shrinkpad_shrinks_and_pads_at_seeded_random_offsets(tiny):
    defense = fitted("shrinkpad", tiny, padding=4)
    x = torch.ones(64, 1, 16, 16)
    out = defense.transform(x)
    assert out.shape == x.shape
    content = (out[:, 0] > 0).float()
    assert torch.all(content.sum((1, 2)) == 12 * 12)  # the shrunk image, 12 x 12, the rest zero padding
    rows = content.any(2).float().argmax(1)  # the first row of content: the vertical offset
    assert len(set(rows.tolist())) > 1 and set(rows.tolist()) <= set(range(5))
    again = fitted("shrinkpad", tiny, padding=4).transform(x)
    assert torch.equal(out, again)  # seeded


def test_input_transforms_do_what_they_say(tiny):
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16)
    levels = fitted("bitdepth", tiny, bits=2).transform(ramp).unique()
    assert torch.allclose(levels, torch.tensor([0, 1 / 3, 2 / 3, 1]))
    flat = torch.full((2, 1, 16, 16), 0.4)
    assert torch.allclose(fitted("blur", tiny).transform(flat), flat)  # a blur keeps a constant image
    jpeg = fitted("jpeg", tiny, quality=10).transform(tiny.test_x[:8])
    assert jpeg.shape == (8, 1, 16, 16) and 0 < (jpeg - tiny.test_x[:8]).abs().mean() < 0.2
    # a 2x2 median (SciPy's anchoring: the window covers the pixel and the ones before it)
    image = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]).view(1, 1, 3, 3)
    median = fitted("median", tiny, window=2).transform(image)[0, 0]
    assert median.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    dots = torch.zeros(1, 1, 4, 4)
    dots[..., 1:3, 1:3] = 1.0  # a 2x2 block survives a 2x2 median
    assert fitted("median", tiny, window=2).transform(dots)[0, 0, 2, 2] == 1.0


def test_clipping_bounds_never_exceed_the_clean_maxima(tiny):
    defense = fitted("clipping", tiny, quantile=1.0)
    tight = fitted("clipping", tiny, quantile=0.9)
    assert defense.layers_ == ["layer1", "layer2", "layer3"]
    seen = {}
    handles = [
        tiny.model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o.transpose(0, 1).flatten(1).amax(1))
        )
        for name in defense.layers_
    ]
    with torch.inference_mode():
        tiny.model(tiny.reference)
    for handle in handles:
        handle.remove()
    for layer in defense.layers_:
        assert torch.allclose(defense.bounds_[layer], seen[layer])
        assert torch.all(tight.bounds_[layer] <= seen[layer])
    assert (defense.predict(tiny.test_x) == tiny.test_y).float().mean() > 0.97  # clean maxima keep clean inputs


def test_clipping_auto_takes_the_tightest_quantile_within_the_tolerance(tiny):
    def changed(defense) -> float:
        return float((defense.predict(tiny.reference) != tiny.model(tiny.reference).argmax(1)).float().mean())

    auto = fitted("clipping", tiny, tolerance=0.05)
    assert auto.quantile_ in auto.QUANTILES and changed(auto) <= 0.05
    tighter = [q for q in auto.QUANTILES if q < auto.quantile_]
    if tighter:  # the next tighter quantile breaks the tolerance
        assert changed(fitted("clipping", tiny, quantile=tighter[-1])) > 0.05
    with pytest.raises(FireDefenseError, match="quantile"):
        fitted("clipping", tiny, quantile="max")


def test_correction_with_the_true_trigger_restores_poisoned_inputs(tiny):
    defense = fitted("correction", tiny)
    assert defense.layer_ == "layer3"
    poisoned = defense.predict(tiny.poisoned_x)
    assert (poisoned == 0).float().mean() < 0.1
    assert (poisoned == tiny.poisoned_y).float().mean() > 0.8


def test_februus_masks_the_patch_and_inpaints_it(tiny):
    defense = fitted("februus", tiny)
    heat, predicted = defense.heatmap(tiny.poisoned_x[:50])
    assert (predicted == 0).float().mean() > 0.9
    corner = heat[:, -3:, -3:].mean((1, 2))
    assert (corner > heat.mean((1, 2))).float().mean() > 0.8  # Grad-CAM finds the trigger
    purified = defense.purify(tiny.poisoned_x[:50])
    assert (purified[..., -3:, -3:] < 0.9).float().mean() > 0.8  # the white patch is inpainted away
    assert (defense.predict(tiny.poisoned_x) == 0).float().mean() < 0.2


def test_evaluate_gives_the_clean_references_true_labels_only_to_a_defense_that_needs_them(tmp_path):
    from fire_adapters.records import load_record
    from fire_bench.evaluation import defender, evaluate
    from fire_bench.grid import DefenseSpec, Protocol
    from fire_bench.protocol import split_record

    record = load_record(write_backdoored_record(tmp_path, n_train=200, n_test=100, epochs=1))
    protocol = Protocol(clean_size=60, k=2, defender_share=0.2, eval_clean=20, eval_poisoned=20)
    split = split_record(record, seed=0, clean_size=60, defender_share=0.2)
    truth = torch.as_tensor(split.clean_reference.labels)
    for spec, labelled in (
        (DefenseSpec("scale-up"), True),
        (DefenseSpec("ibd-psc"), True),
        (DefenseSpec("scale-up", {"use_labels": False}), False),
        (DefenseSpec("strip", {"n_copies": 8}), False),
    ):
        defense = create_defense(spec.name, **spec.params)
        data = defender(record, split, defense, protocol, torch.device("cpu"))
        assert (data.clean_labels is not None) == labelled, spec
        if labelled:
            assert torch.equal(data.clean_labels, truth)  # the training split's labels, not the model's guesses
        row, fitted_defense = evaluate(record, split, spec, protocol, "cpu")
        assert torch.equal(fitted_defense.clean_labels_, truth) if labelled else fitted_defense.clean_labels_ is None
        assert {"tpr", "fpr", "auroc"} <= row.keys()


def test_the_fire_defenses_declared_choices_are_the_cores():
    from typing import get_args

    from fire_bench.defenses.fire import Mode, Selection, Weight
    from fire_defense import MODES
    from fire_defense.selection import SELECTIONS, WEIGHTS

    assert set(get_args(Mode)) == set(MODES) and set(get_args(Selection)) == set(SELECTIONS)
    assert set(get_args(Weight)) == set(WEIGHTS)

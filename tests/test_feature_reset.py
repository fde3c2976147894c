"""feature-reset (InstantForget-style): its gate, its reset, its statistics, its settings checks."""

from __future__ import annotations

import pytest
import torch

from fire_bench.defenses import create_defense
from fire_bench.defenses.feature_reset import FeatureReset, ledoit_wolf, pooled
from fire_defense import FireDefenseError

pytestmark = pytest.mark.usefixtures("one_thread")


def fitted(tiny, **params) -> FeatureReset:
    return create_defense("feature-reset", **params).fit(tiny.model, tiny.reference)


def planted(model: torch.nn.Module, rows: int, offset: float = 5.0):
    """A hook on the tiny model's last stage that adds ``offset`` to one channel of the first ``rows`` inputs."""

    def hook(module, inputs, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:rows, 0] += offset
        return out

    return model.layer3.register_forward_hook(hook)


def test_it_removes_the_tiny_backdoor_at_a_small_clean_cost(tiny):
    defense = fitted(tiny)
    assert defense.layer_ == "layer3" and defense.needs == frozenset()  # the last stage; clean data only
    with torch.inference_mode():
        undefended_clean = tiny.model(tiny.test_x).argmax(1)
        undefended_poisoned = tiny.model(tiny.poisoned_x).argmax(1)
    assert (undefended_poisoned == 0).float().mean() > 0.9  # the backdoor works
    labels, poisoned = defense.predict(tiny.test_x), defense.predict(tiny.poisoned_x)
    assert (poisoned == 0).float().mean() < 0.05
    assert (poisoned == tiny.poisoned_y).float().mean() > 0.9  # the second-ranked class is the true one here
    assert (undefended_clean == tiny.test_y).float().mean() - (labels == tiny.test_y).float().mean() < 0.04
    kept = defense.score(tiny.test_x).double() <= defense.threshold_
    assert torch.equal(labels[kept], undefended_clean[kept])  # an input that is not flagged is not touched
    assert 1 < defense.forward_passes < 1.05


def test_the_share_flagged_on_unseen_clean_inputs_is_near_the_fixed_fpr(tiny):
    for fpr in (0.05, 0.2):
        defense = fitted(tiny, fpr=fpr)
        share = float((defense.score(tiny.test_x).double() > defense.threshold_).double().mean())
        assert fpr / 2 <= share <= 2 * fpr, (fpr, share)
    strict = fitted(tiny, fpr=0.01)
    assert (strict.score(tiny.poisoned_x).double() > strict.threshold_).all()  # every triggered input is flagged


def test_a_planted_feature_offset_is_flagged_and_reset_toward_a_non_target_class(tiny):
    x = tiny.test_x[:20]
    for strength in (1.0, 0.5):
        defense = fitted(tiny, strength=strength)
        plant = planted(tiny.model, rows=5)
        try:
            scores, labels = defense.score(x), defense.predict(x)
            with torch.inference_mode():
                logits, maps = tiny.model(x), tiny.model.layer3(tiny.model.layer2(tiny.model.layer1(x)))
        finally:
            plant.remove()
        flagged = scores.double() > defense.threshold_
        assert flagged[:5].all() and flagged.sum() < 10  # the planted inputs, and few others
        neutral = defense.class_maps_[logits.topk(2, dim=1).indices[:, 1]]  # the class ranked second
        with torch.inference_mode():
            expected = tiny.model.head(torch.lerp(maps, neutral, strength)).argmax(1)
        assert torch.equal(labels[flagged], expected[flagged])  # the stage output moved, the rest of the net ran
        assert torch.equal(labels[~flagged], logits[~flagged].argmax(1))
        if strength == 1.0:
            assert (labels[:5] != logits[:5].argmax(1)).all()  # moved off the predicted class


def test_the_neutral_is_never_the_predicted_class_and_mean_is_the_clean_mean(tiny):
    defense = fitted(tiny)
    logits = torch.randn(200, 10, generator=torch.Generator().manual_seed(0))
    maps = defense.neutral_maps(logits)
    chosen = torch.cdist(maps.flatten(1), defense.class_maps_.flatten(1)).argmin(1)
    assert (chosen != logits.argmax(1)).all()
    masked = logits.scatter(1, logits.argmax(1, keepdim=True), float("-inf"))
    assert torch.equal(chosen, masked.argmax(1))  # the highest-ranked other class (all ten seen here)
    mean = fitted(tiny, neutral="mean")
    assert torch.equal(mean.neutral_maps(logits[:3]), mean.mean_map_.expand(3, *mean.mean_map_.shape))
    assert pooled(defense.mean_map_[None]).shape == (1, 32)  # a conv map pools to its channels


def shrinkage_by_definition(features: torch.Tensor) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity, summed one sample at a time (their Lemma 3.3)."""
    x = features - features.mean(0)
    sample = x.T @ x / len(x)
    target = torch.trace(sample) / x.shape[1] * torch.eye(x.shape[1], dtype=x.dtype)
    spread = sum(((row[:, None] * row[None, :] - sample) ** 2).sum() for row in x) / len(x) ** 2
    distance = ((sample - target) ** 2).sum()
    return float(min(spread, distance) / distance)


def test_ledoit_wolf_shrinks_as_the_data_say():
    generator = torch.Generator().manual_seed(0)
    few = torch.randn(20, 40, generator=generator, dtype=torch.float64)  # fewer samples than dimensions
    covariance, shrinkage = ledoit_wolf(few)
    assert torch.linalg.eigvalsh(covariance).min() > 0 and shrinkage > 0.5
    scales = torch.logspace(0, 1, 8, dtype=torch.float64)
    many = torch.randn(4000, 8, generator=generator, dtype=torch.float64) * scales
    assert ledoit_wolf(many)[1] < 0.01  # plenty of data: hardly any shrinkage
    some = many[:40]
    covariance, shrinkage = ledoit_wolf(some)
    assert 0 < shrinkage < 1
    assert shrinkage == pytest.approx(shrinkage_by_definition(some))
    assert ledoit_wolf(few)[1] == pytest.approx(shrinkage_by_definition(few))
    sample = torch.cov(some.T, correction=0)
    expected = (1 - shrinkage) * sample + shrinkage * torch.trace(sample) / 8 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(covariance, expected)


def test_fits_and_decisions_are_deterministic(tiny):
    first, second = fitted(tiny, fpr=0.05), fitted(tiny, fpr=0.05)
    assert first.threshold_ == second.threshold_
    assert torch.equal(first.predict(tiny.poisoned_x), second.predict(tiny.poisoned_x))
    assert torch.equal(first.score(tiny.test_x), second.score(tiny.test_x))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"fpr": 0}, "fpr must be in"),
        ({"fpr": 1.0}, "fpr must be in"),
        ({"fpr": float("nan")}, "fpr must be in"),
        ({"fpr": True}, "fpr must be in"),
        ({"strength": 0}, "strength must be in"),
        ({"strength": 1.5}, "strength must be in"),
        ({"neutral": "median"}, "neutral must be one of runner-up, mean"),
        ({"layer": ["layer1", "layer2"]}, "layer must be 'last' or one layer name"),
        ({"layer": "layer9"}, "no layer 'layer9'"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tiny, params, match):
    with pytest.raises(FireDefenseError, match=match) as error:
        fitted(tiny, **params)
    assert "\n" not in str(error.value)


def test_too_small_a_reference_is_refused(tiny):
    with pytest.raises(FireDefenseError, match="at least 10"):
        create_defense("feature-reset").fit(tiny.model, tiny.reference[:9])

"""FIRE-aware: its regularizer on planted activations, the trainer's feature-loss hook, its trigger by composition."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from fire_adapters import ImageSet
from fire_adapters.attacks import create_attack
from fire_adapters.attacks.fire_aware import mean_gap
from fire_adapters.preprocess import to_tensor, with_normalization
from fire_adapters.training import TrainConfig, train_backdoored_model
from fire_defense import FireDefenseError
from fire_defense.layers import candidate_layers

from helpers import random_images

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = np.arange(256) % 10
TRAIN = ImageSet(random_images(256, 28, 28, 1, seed=6), LABELS)


def staged_model() -> nn.Module:
    """A small network whose two stages FIRE's candidate rule finds (``layer1``, ``layer2``).

    Each stage ends on a convolution, not a ReLU, as a PreAct-ResNet stage ends on a residual sum.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            layer1=nn.Conv2d(3, 4, 3),
            layer2=nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3)),
            pool=nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1)),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 10),
        )
    )


ONE_EPOCH = TrainConfig(epochs=1)


def train(attack, model, config=ONE_EPOCH):
    return train_backdoored_model(model, attack, TRAIN, attack.train_positions(LABELS), config, 0, "cpu", False)


def test_mean_gap_on_a_planted_case_is_the_hand_computed_value():
    # clean rows (0, 0), (2, 0), (1, 3): mean (1, 1), unbiased variances 1 and 3, trace 4;
    # the poisoned row (3, 5) is (2, 4) away: squared distance 20, so the gap is 20 / 4 = 5.
    features = torch.tensor([[3.0, 5.0], [0.0, 0.0], [2.0, 0.0], [1.0, 3.0]]).reshape(4, 2, 1, 1)
    poisoned = torch.tensor([True, False, False, False])
    assert mean_gap(features, poisoned).item() == pytest.approx(5.0)
    # a second stage whose poisoned row sits at the clean mean contributes 0; the loss is weight x the average
    level = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    attack = create_attack("fire-aware", "fashionmnist", weight=2.0)
    loss = attack.feature_loss({"layer1": features, "layer2": level}, poisoned)
    assert loss.item() == pytest.approx(2.0 * (5.0 + 0.0) / 2)


def test_mean_gap_has_no_value_without_both_groups_and_ignores_the_activations_scale():
    features = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert mean_gap(features, torch.zeros(4, dtype=torch.bool)) is None
    assert mean_gap(features, torch.tensor([True, True, True, False])) is None  # one clean sample: no spread
    poisoned = torch.tensor([True, False, False, False])
    gap = mean_gap(features, poisoned)
    assert mean_gap(3 * features, poisoned).item() == pytest.approx(gap.item())
    gap.backward()
    # scale-invariant, so the gradient has no component along the activations themselves: shrinking them gains nothing
    assert (features.grad * features).sum().abs().item() < 1e-9 and features.grad.abs().sum().item() > 1e-3


def test_the_trigger_is_the_composed_attack_s_and_the_samples_the_same():
    images = random_images(6, 28, 28, 1, seed=1)
    for trigger in ("badnet", "blended"):
        attack = create_attack("fire-aware", "fashionmnist", trigger=trigger, seed=3, ratio=0.2)
        plain = create_attack(trigger, "fashionmnist", seed=3, ratio=0.2)
        np.testing.assert_array_equal(attack(images), plain(images))
        np.testing.assert_array_equal(attack.train_positions(LABELS), plain.train_positions(LABELS))
    all_to_all = create_attack("fire-aware", "fashionmnist", all_to_all=True)
    np.testing.assert_array_equal(all_to_all.target_labels(np.array([0, 9])), [1, 0])


def test_it_regularises_fire_s_candidate_stages_and_nothing_at_weight_zero():
    model = staged_model()
    assert create_attack("fire-aware", "fashionmnist").feature_layers(model) == candidate_layers(model)
    assert create_attack("fire-aware", "fashionmnist", weight=0.0).feature_layers(model) == []
    assert create_attack("badnet", "fashionmnist").feature_layers(model) == []  # the base default
    assert create_attack("badnet", "fashionmnist").feature_loss({}, torch.ones(1, dtype=torch.bool)) is None


def test_the_feature_loss_changes_training_through_the_model_s_gradients():
    badnet, plain, regularised = staged_model(), staged_model(), staged_model()
    train(create_attack("badnet", "fashionmnist", ratio=0.25), badnet)
    train(create_attack("fire-aware", "fashionmnist", ratio=0.25, weight=0.0), plain)
    attack = create_attack("fire-aware", "fashionmnist", ratio=0.25, weight=10.0)
    seen = []
    original = attack.feature_loss

    def spy(features, poisoned):
        loss = original(features, poisoned)
        seen.append((sorted(features), all(f.requires_grad for f in features.values()), loss))
        return loss

    attack.feature_loss = spy
    train(attack, regularised)
    for left, right in zip(badnet.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(left, right)  # weight 0: exactly BadNets' training
    assert len(seen) == len(TRAIN) // 128
    for names, with_graph, loss in seen:
        assert names == ["layer1", "layer2"] and with_graph and loss is not None and loss.grad_fn is not None
    pairs = zip(plain.state_dict().values(), regularised.state_dict().values(), strict=True)
    moved = [not torch.equal(a, b) for a, b in pairs]
    assert all(moved[:4]) and not any(m._forward_hooks for m in regularised.modules())  # stages moved; hooks gone


def test_training_with_the_regulariser_closes_the_gap_it_measures():
    def gap_after(weight):
        model = staged_model()
        attack = create_attack("fire-aware", "fashionmnist", ratio=0.25, weight=weight, trigger="blended")
        train(attack, model, TrainConfig(epochs=10, batch_size=64))
        positions = attack.train_positions(LABELS)
        images = TRAIN.images.copy()
        images[positions] = attack(images[positions])
        poisoned = torch.zeros(len(images), dtype=torch.bool)
        poisoned[positions] = True
        features = {}
        hook = model.layer2.register_forward_hook(lambda m, i, o: features.setdefault("layer2", o))
        with torch.no_grad():
            with_normalization(model, attack.dataset).eval()(to_tensor(images))
        hook.remove()
        return mean_gap(features["layer2"], poisoned).item()

    plain, regularised = gap_after(0.0), gap_after(10.0)
    print(f"layer2 gap: weight 0 {plain:.4f}, weight 10 {regularised:.4f}")
    assert regularised < 0.5 * plain


@pytest.mark.parametrize(
    ("params", "message"),
    [({"weight": -1.0}, "weight must be a finite number >= 0"), ({"trigger": "sig"}, "trigger must be one of")],
)
def test_bad_parameters_are_refused_in_one_line(params, message):
    with pytest.raises(FireDefenseError, match=message):
        create_attack("fire-aware", "fashionmnist", **params)

"""Adap-Blend and Adap-Patch: partial triggers in training, covers that keep their labels, the whole trigger at test.

The registry-wide checks (shape, dtype, determinism, rebuilding, refusing wrong images) are in
``tests/test_attacks.py``; these test what makes the two attacks adaptive.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fire_adapters import get_dataset_spec
from fire_adapters.attacks import AdapBlend, AdapPatch, create_attack
from fire_adapters.preprocess import to_tensor
from fire_defense import FireDefenseError

from helpers import random_images

NAMES = ("adap-blend", "adap-patch")
DATASETS = ("fashionmnist", "cifar10")


def batch(n: int, dataset: str, seed: int = 0) -> torch.Tensor:
    return to_tensor(random_images(n, *get_dataset_spec(dataset).img_size, seed=seed))


def pieces_present(attack, clean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Bool ``(N, pieces)``: which pieces' regions the attack changed in each image."""
    changed = (out != clean).any(dim=1)  # (N, H, W)
    return torch.einsum("nhw,phw->np", changed.double(), attack.regions.double()) > 0


@pytest.mark.parametrize("dataset", DATASETS)
def test_adap_blend_pieces_tile_the_image_in_a_grid(dataset):
    attack: AdapBlend = create_attack("adap-blend", dataset)
    height, width = get_dataset_spec(dataset).image_size
    assert attack.regions.shape == (16, height, width)
    assert (attack.regions.sum(0) == 1).all()  # disjoint and covering every pixel
    sizes = attack.regions.flatten(1).sum(1)
    assert int(sizes.min()) == int(sizes.max()) == height * width // 16  # 28 and 32 split into four equal bands
    assert attack.carried == 8  # mask rate 0.5: half of the pieces on a training sample
    uneven = create_attack("adap-blend", dataset, pieces=9, mask_rate=0.4)
    assert (uneven.regions.sum(0) == 1).all() and uneven.carried == 5  # 28 and 32 are not divisible by 3


@pytest.mark.parametrize("dataset", DATASETS)
def test_adap_patch_pieces_are_disjoint_squares_at_the_corners(dataset):
    attack: AdapPatch = create_attack("adap-patch", dataset, patch_size=4)
    height, width = get_dataset_spec(dataset).image_size
    assert attack.regions.shape == (4, height, width) and attack.carried == 1
    assert (attack.regions.sum(0) <= 1).all() and (attack.regions.flatten(1).sum(1) == 16).all()
    corners = [(height - 1, width - 1), (0, 0), (0, width - 1), (height - 1, 0)]
    assert all(bool(attack.regions[p][corner]) for p, corner in enumerate(corners))
    eight = create_attack("adap-patch", dataset, pieces=8, patch_size=4)
    assert (eight.regions.sum(0) <= 1).all() and int(eight.regions.sum()) == 8 * 16
    assert set(np.unique(attack.pattern.numpy())) == {0.0, 1.0}  # black-and-white pixels


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", NAMES)
def test_training_samples_carry_a_random_partial_trigger(name, dataset):
    attack = create_attack(name, dataset, cover_rate=0.0, ratio=0.5)
    clean = batch(64, dataset)
    labels = torch.arange(64) % 10
    poisoned = torch.ones(64, dtype=torch.bool)
    out, out_labels, extra = attack.training_batch(clean, labels, poisoned, torch.Generator().manual_seed(0))
    present = pieces_present(attack, clean, out)
    assert (present.sum(1) == attack.carried).all() and attack.carried < len(attack.regions)  # never the whole
    assert len({tuple(row.tolist()) for row in present}) > 1  # a different subset from one sample to the next
    expected = attack.stamp(clean, present, attack.alpha)  # x + alpha * (pattern - x) on the carried pieces
    torch.testing.assert_close(out, expected)
    assert (out_labels == 0).all() and extra is None


@pytest.mark.parametrize("name", NAMES)
def test_covers_carry_a_partial_trigger_and_keep_their_labels(name):
    attack = create_attack(name, "fashionmnist", target=3, ratio=0.2, cover_rate=0.4)
    clean = batch(400, "fashionmnist")
    labels = torch.arange(400) % 10
    poisoned = torch.zeros(400, dtype=torch.bool)
    poisoned[:80] = True
    out, out_labels, _ = attack.training_batch(clean, labels, poisoned, torch.Generator().manual_seed(1))
    changed = (out != clean).flatten(1).any(1)
    covers = changed & ~poisoned
    assert changed[:80].all() and (out_labels[:80] == 3).all()  # poisoned: trigger and the target label
    assert torch.equal(out_labels[~poisoned], labels[~poisoned])  # covers (and the rest) keep their labels
    assert 120 <= int(covers.sum()) <= 200  # each of the 320 others with probability 0.4 / 0.8 (mean 160)
    assert (pieces_present(attack, clean, out)[covers].sum(1) == attack.carried).all()
    none = create_attack(name, "fashionmnist", ratio=0.2, cover_rate=0.0)
    out, _, _ = none.training_batch(clean, labels, poisoned, torch.Generator().manual_seed(1))
    assert torch.equal(out[~poisoned], clean[~poisoned])  # no conservatism without covers


@pytest.mark.parametrize("name", NAMES)
def test_all_to_all_poisoned_samples_go_to_the_next_class(name):
    attack = create_attack(name, "cifar10", all_to_all=True, cover_rate=0.0)
    labels = torch.arange(10)
    _, out_labels, _ = attack.training_batch(
        batch(10, "cifar10"), labels, torch.ones(10, dtype=torch.bool), torch.Generator().manual_seed(0)
    )
    assert torch.equal(out_labels, (labels + 1) % 10)


def test_adap_blend_test_trigger_is_the_whole_pattern_at_test_alpha():
    attack = create_attack("adap-blend", "cifar10", alpha=0.15, test_alpha=0.2)
    images = random_images(5, 32, 32, 3, seed=3)
    expected = 0.8 * images.astype(np.float64) + 0.2 * attack.pattern.permute(1, 2, 0).numpy() * 255
    out = attack(images)
    assert np.abs(out - expected).max() <= 0.5 + 1e-6  # every pixel blended, rounded to uint8
    assert torch.equal(attack.pattern, create_attack("adap-blend", "cifar10", seed=9).pattern)  # one across seeds
    assert not torch.equal(attack.pattern, create_attack("adap-blend", "cifar10", pattern_seed=1).pattern)


def test_adap_patch_test_trigger_pastes_every_patch_and_nothing_else():
    attack = create_attack("adap-patch", "cifar10")
    images = random_images(5, 32, 32, 3, seed=4)
    out = attack(images)
    union = attack.regions.any(0).numpy()
    patches = (attack.pattern.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[:, union], np.broadcast_to(patches[union], out[:, union].shape))
    np.testing.assert_array_equal(out[:, ~union], images[:, ~union])
    faint = create_attack("adap-patch", "cifar10", test_alpha=0.5)(images).astype(int)
    assert np.abs(faint[:, union] - (images[:, union].astype(int) + patches[union]) / 2).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_training_batches_are_seeded(name):
    attack = create_attack(name, "fashionmnist", ratio=0.1, cover_rate=0.3)
    clean, labels = batch(100, "fashionmnist"), torch.arange(100) % 10
    poisoned = torch.arange(100) < 10

    def run(seed: int) -> torch.Tensor:
        return attack.training_batch(clean, labels, poisoned, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
    rebuilt = create_attack(name, "fashionmnist", **{k: v for k, v in attack.params().items() if k != "dataset"})
    assert torch.equal(rebuilt.training_batch(clean, labels, poisoned, torch.Generator().manual_seed(5))[0], run(5))


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("adap-blend", {"alpha": 0.0}, r"adap-blend: alpha must be in \(0, 1\]"),
        ("adap-blend", {"test_alpha": 1.5}, r"adap-blend: test_alpha must be in \(0, 1\]"),
        ("adap-blend", {"pieces": 12}, "pieces must be a square number >= 4"),
        ("adap-blend", {"pieces": 1}, "pieces must be a square number >= 4"),
        ("adap-blend", {"pieces": 33 * 33}, "pieces must be a square number >= 4 whose root fits the image"),
        ("adap-blend", {"mask_rate": 1.0}, "mask_rate must mask between 1 and pieces - 1"),
        ("adap-blend", {"mask_rate": 0.01}, "mask_rate must mask between 1 and pieces - 1"),
        ("adap-blend", {"cover_rate": -0.1}, r"cover_rate must be in \[0, 1\)"),
        ("adap-blend", {"ratio": 0.6, "cover_rate": 0.5}, "ratio \\+ cover_rate <= 1"),
        ("adap-patch", {"pieces": 9}, r"pieces must be an integer in 2\.\.8"),
        ("adap-patch", {"pieces": 1}, r"pieces must be an integer in 2\.\.8"),
        ("adap-patch", {"patch_size": 11}, r"patch_size must be an integer from 1 to a third of the image side \(10\)"),
        ("adap-patch", {"patch_size": 0}, "patch_size must be an integer"),
        ("adap-patch", {"alpha": 2.0}, r"adap-patch: alpha must be in \(0, 1\]"),
        ("adap-patch", {"pieces": 2.5}, "pieces must be an integer"),
    ],
)
def test_bad_parameters_are_refused_in_one_line(name, params, message):
    with pytest.raises(FireDefenseError, match=message) as raised:
        create_attack(name, "cifar10", **params)
    assert "\n" not in str(raised.value)


def test_the_trainer_is_told_to_leave_poisoned_samples_to_the_attack():
    # The partial trigger and the covers are drawn per batch, so the trainer must not stamp the test trigger.
    assert not create_attack("adap-blend", "mnist").static_trigger
    assert not create_attack("adap-patch", "mnist").static_trigger


@pytest.mark.parametrize("name", NAMES)
def test_the_trainer_runs_the_attack_and_sees_its_labels(name):
    from torch import nn

    from fire_adapters import ImageSet
    from fire_adapters.training import TrainConfig, train_backdoored_model

    attack = create_attack(name, "fashionmnist", ratio=0.25, cover_rate=0.25)
    labels = np.arange(256) % 10
    train = ImageSet(random_images(256, 28, 28, 1, seed=6), labels)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    seen = []
    original = attack.training_batch

    def spy(images, batch_labels, poisoned, generator):
        out = original(images, batch_labels, poisoned, generator)
        seen.append((poisoned.clone(), batch_labels.clone(), out[1].clone()))
        return out

    attack.training_batch = spy
    history = train_backdoored_model(
        model, attack, train, attack.train_positions(labels), TrainConfig(epochs=1), 0, "cpu", False
    )
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    for poisoned, before, after in seen:
        assert (after[poisoned] == 0).all() and torch.equal(after[~poisoned], before[~poisoned])
        assert not (before[poisoned] == 0).all()  # the trainer left the labels to the attack

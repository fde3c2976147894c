"""Each attack's defining property, on small arrays; the shared label and sample-selection rules.

The shared checks run for every registered attack on every registered dataset's image size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fire_adapters import ImageSet, get_dataset_spec, list_datasets
from fire_adapters.attacks import ATTACKS, InputAware, WaNet, create_attack, list_attacks
from fire_adapters.attacks.bpp import floyd_steinberg
from fire_defense import FireDefenseError

from helpers import random_images

GREY = random_images(6, 28, 28, 1, seed=1)
COLOUR = random_images(6, 32, 32, 3, seed=2)


@pytest.mark.parametrize("dataset", list_datasets())
@pytest.mark.parametrize("name", list_attacks())
def test_every_attack_keeps_shape_and_dtype_and_is_deterministic(name, dataset):
    images = random_images(6, *get_dataset_spec(dataset).img_size, seed=1)
    first = create_attack(name, dataset, seed=3)(images)
    second = create_attack(name, dataset, seed=3)(images)
    assert first.dtype == np.uint8 and first.shape == images.shape
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, images)


@pytest.mark.parametrize("name", list_attacks())
def test_params_rebuild_the_attack(name):
    attack = create_attack(name, "cifar10", seed=5)
    params = attack.params()
    rebuilt = create_attack(name, params.pop("dataset"), **params)
    rebuilt.load_state_dict(attack.state_dict())
    np.testing.assert_array_equal(rebuilt(COLOUR), attack(COLOUR))


@pytest.mark.parametrize("name", list_attacks())
def test_wrong_images_are_refused_in_one_line(name):
    with pytest.raises(FireDefenseError, match=r"expects uint8 cifar10 images \(N, 32, 32, 3\)"):
        create_attack(name, "cifar10")(GREY)


@pytest.mark.parametrize("name", list_attacks())
def test_every_attack_poisons_its_chosen_samples_towards_the_attackers_labels(name):
    attack = create_attack(name, "cifar10", target=2, ratio=0.1, seed=4)
    labels = np.repeat(np.arange(10), 3)
    split = ImageSet(random_images(30, 32, 32, 3, seed=5), labels)
    positions = attack.train_positions(labels)
    assert len(positions) == 3 and (not attack.clean_label or (labels[positions] == 2).all())
    poisoned = attack.poison(split, positions)
    np.testing.assert_array_equal(poisoned.indices, positions)
    np.testing.assert_array_equal(poisoned.labels, labels[positions])  # the true labels stay
    np.testing.assert_array_equal(poisoned.targets, attack.target_labels(labels[positions]))
    np.testing.assert_array_equal(poisoned.images, attack(split.images[positions]))
    tested = attack.test_positions(labels)
    assert len(tested) == 27 and (attack.target_labels(labels[tested]) != labels[tested]).all()


def test_badnet_touches_only_its_3x3_corner():
    out = create_attack("badnet", "cifar10")(COLOUR)
    changed = np.any(out != COLOUR, axis=(0, 3))
    assert not changed[:-3, :].any() and not changed[:, :-3].any()
    assert (out[:, -3:, -3:, :] == 255).all()


def test_blended_is_the_stated_convex_combination():
    attack = create_attack("blended", "cifar10", alpha=0.2)
    pattern = attack.pattern
    out = attack(COLOUR).astype(np.float64)
    expected = 0.8 * COLOUR + 0.2 * pattern
    assert np.all(out <= expected + 1e-4) and np.all(out > expected - 1)  # truncated to uint8, as BackdoorBench
    assert np.array_equal(pattern, create_attack("blended", "cifar10", seed=9).pattern)  # fixed across seeds
    assert not np.array_equal(pattern, create_attack("blended", "cifar10", pattern_seed=1).pattern)


def test_sig_adds_a_horizontal_sinusoid_and_is_clean_label():
    attack = create_attack("sig", "fashionmnist")
    grey = np.full((1, 28, 28, 1), 128, dtype=np.uint8)
    added = attack(grey)[0, :, :, 0].astype(np.float64) - 128
    np.testing.assert_array_equal(added, np.broadcast_to(added[0], (28, 28)))  # the same in every row
    expected = 40 * np.sin(2 * np.pi * np.arange(28) * 6 / 28)
    assert np.all(np.abs(added[0] - expected) < 1)  # truncation to uint8
    labels = np.repeat(np.arange(10), 10)
    positions = attack.train_positions(labels)
    assert attack.clean_label and (labels[positions] == 0).all() and len(positions) == 5  # half the target class
    whole = create_attack("sig", "fashionmnist", ratio=0.2).train_positions(labels)
    np.testing.assert_array_equal(whole, np.arange(10))  # capped at the target class
    with pytest.raises(FireDefenseError, match="clean-label"):
        create_attack("sig", "cifar10", all_to_all=True)


def test_wanet_warp_is_smooth_bounded_and_exact_at_zero_strength():
    attack = create_attack("wanet", "cifar10", s=0.5, k=4)
    height = 32
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, height), indexing="ij")
    identity = torch.stack((xs, ys), dim=2)[None]
    displacement = (attack.grid - identity) * height / 2  # in pixels
    assert attack.grid.abs().max() <= 1
    assert displacement.abs().max() <= 0.5 * 4  # s times at most a few units of the normalised field
    inner = displacement[:, 1:-1, 1:-1]  # the outermost pixels are clamped to the image, as in WaNet
    steps = (inner[:, 1:] - inner[:, :-1]).abs().max(), (inner[:, :, 1:] - inner[:, :, :-1]).abs().max()
    assert max(steps) < 0.2 < displacement.abs().max()  # neighbours move together: a smooth, non-trivial field
    still = create_attack("wanet", "cifar10", s=1e-9)
    np.testing.assert_array_equal(still(COLOUR), COLOUR)  # the identity grid reproduces the image


def test_wanet_noise_mode_warps_only_clean_samples_and_keeps_labels():
    attack: WaNet = create_attack("wanet", "cifar10", cross_ratio=2)
    images = torch.rand(20, 3, 32, 32)
    labels = torch.arange(20)
    poisoned = torch.zeros(20, dtype=torch.bool)
    poisoned[:3] = True
    out, out_labels, extra = attack.training_batch(images, labels, poisoned, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(1).any(1)
    assert not changed[:3].any() and int(changed.sum()) == 6 and extra is None
    assert torch.equal(out_labels, labels)


def test_bpp_quantises_each_image_to_its_own_levels():
    attack = create_attack("bpp", "cifar10", squeeze_num=8, dithering=False)
    out = attack(COLOUR)
    levels = np.round(np.arange(8) / 7 * 255).astype(np.uint8)
    assert set(np.unique(out)) <= set(levels)  # eight levels per channel
    assert np.abs(out.astype(int) - COLOUR).max() <= 19  # at most half a step (255 / 14) from the original
    change = out.astype(int) - COLOUR
    assert not np.array_equal(change[0], change[1])  # the change is the image's own: sample-specific
    dithered = create_attack("bpp", "cifar10", squeeze_num=8)(COLOUR)  # dithering is the default
    assert set(np.unique(dithered)) <= set(levels) and not np.array_equal(dithered, out)


def test_floyd_steinberg_dithering_matches_a_hand_computation():
    # 2x2 at two levels (0, 255): 100 -> 0 (error 100: +43.75 right, +31.25 down, +6.25 down-right); 143.75 -> 255
    # (error -111.25: -20.86 down-left, -34.77 down); 110.39 -> 0 (error +48.30 right); 119.78 -> 0.
    square = np.full((1, 2, 2, 1), 100, dtype=np.uint8)
    np.testing.assert_array_equal(floyd_steinberg(square, 2)[0, :, :, 0], [[0, 255], [0, 0]])
    # one row at three levels (0, 127.5, 255): 50 -> 0; 50 + 21.875 -> 127.5 (rounded to 128); 50 - 24.34 -> 0.
    row = np.full((1, 1, 3, 1), 50, dtype=np.uint8)
    np.testing.assert_array_equal(floyd_steinberg(row, 3)[0, 0, :, 0], [0, 128, 0])
    plain = create_attack("bpp", "fashionmnist", squeeze_num=2, dithering=False)
    grey = np.full((1, 28, 28, 1), 100, dtype=np.uint8)
    assert not plain(grey).any()  # without dithering all of it is 0
    dithered = create_attack("bpp", "fashionmnist", squeeze_num=2, dithering=True)(grey)
    assert abs(dithered.mean() - 100) < 10  # the error is diffused: the mean brightness is kept


def test_bpp_poisons_each_batch_anew_and_trains_with_negatives():
    attack = create_attack("bpp", "cifar10", ratio=0.1, neg_ratio=0.2, dithering=False, target=3)
    assert not attack.static_trigger  # drawn per batch, as BackdoorBench
    images, labels = torch.rand(20, 3, 32, 32), torch.arange(20) % 10
    poisoned = torch.zeros(20, dtype=torch.bool)
    out, out_labels, extra = attack.training_batch(images, labels, poisoned, torch.Generator().manual_seed(0))
    quantised = attack.quantise(images)
    is_quantised = (out - quantised).flatten(1).abs().amax(1) < 1e-6
    changed = (out != images).flatten(1).any(1)
    relabelled = out_labels != labels
    assert int(is_quantised.sum()) == 2 and torch.equal(out_labels[is_quantised], torch.full((2,), 3))
    negatives = changed & ~is_quantised
    assert int(negatives.sum()) == 4 and torch.equal(out_labels[negatives], labels[negatives])  # labels kept
    assert int(changed.sum()) == 6 and int(relabelled.sum()) <= 2 and extra is None
    np.testing.assert_array_equal(
        (quantised.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy(),
        attack((images.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)).numpy()),
    )  # the training trigger is the test trigger
    everything = create_attack("bpp", "cifar10", ratio=1.0, dithering=False)  # no room left for negatives
    out, out_labels, _ = everything.training_batch(images, labels, poisoned, torch.Generator().manual_seed(0))
    assert torch.equal(out, everything.quantise(images)) and (out_labels == 0).all()


def test_inputaware_triggers_differ_per_image_and_only_work_with_their_own_mask():
    attack: InputAware = create_attack("inputaware", "fashionmnist")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        attack.networks.eval()
        own = attack.trigger(x) - x
        borrowed = attack.trigger(x, x.roll(1, dims=0)) - x
        patterns = attack.networks["pattern"](x)
    assert not torch.allclose(patterns[0], patterns[1])  # sample-specific
    assert not torch.allclose(own, borrowed)


def test_inputaware_mask_training_makes_masks_sparse():
    attack: InputAware = create_attack("inputaware", "fashionmnist", mask_epochs=3)
    train = ImageSet(random_images(512, 28, 28, 1, seed=4), np.zeros(512))
    x = torch.rand(16, 1, 28, 28)

    def density() -> float:
        with torch.no_grad():
            attack.networks.eval()
            return float(torch.tanh(attack.networks["mask"](x) * 20 - 10).add(1).div(2).mean())

    before = density()
    attack.prepare(train, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert density() < before and density() < 0.2
    assert not any(p.requires_grad for p in attack.networks["mask"].parameters())  # frozen for the main training


def test_label_rules_and_sample_choice():
    labels = np.repeat(np.arange(10), 20)
    attack = create_attack("badnet", "cifar10", target=3, ratio=0.1, seed=7)
    positions = attack.train_positions(labels)
    assert len(positions) == 20 and len(set(positions)) == 20 and np.all(np.diff(positions) > 0)
    np.testing.assert_array_equal(
        positions, create_attack("badnet", "cifar10", target=3, seed=7).train_positions(labels)
    )
    assert not np.array_equal(positions, create_attack("badnet", "cifar10", target=3, seed=8).train_positions(labels))
    np.testing.assert_array_equal(attack.target_labels(labels[:4]), [3, 3, 3, 3])
    assert set(labels[attack.test_positions(labels)]) == set(range(10)) - {3}
    every = create_attack("badnet", "cifar10", all_to_all=True)
    np.testing.assert_array_equal(every.target_labels(np.array([0, 5, 9])), [1, 6, 0])
    assert len(every.test_positions(labels)) == len(labels)


def test_poison_keeps_indices_and_true_labels():
    split = ImageSet(COLOUR, np.array([0, 1, 2, 3, 4, 5]))
    poisoned = create_attack("badnet", "cifar10").poison(split, np.array([1, 4]))
    np.testing.assert_array_equal(poisoned.indices, [1, 4])
    np.testing.assert_array_equal(poisoned.labels, [1, 4])
    np.testing.assert_array_equal(poisoned.targets, [0, 0])


def test_bad_attack_arguments():
    with pytest.raises(FireDefenseError, match="target 10 is not a cifar10 class"):
        create_attack("badnet", "cifar10", target=10)
    with pytest.raises(FireDefenseError, match=r"ratio must be in \(0, 1\]"):
        create_attack("blended", "cifar10", ratio=0)
    with pytest.raises(FireDefenseError, match="dithering must be True or False, got 'false'"):
        create_attack("bpp", "cifar10", dithering="false")  # a YAML string is truthy: refused, not dithered
    with pytest.raises(FireDefenseError, match="attack 'badnet' takes no alpha; its parameters: patch_size"):
        create_attack("badnet", "cifar10", alpha=0.2)
    assert sorted(ATTACKS.names()) == [
        "adap-blend",
        "adap-patch",
        "badnet",
        "blended",
        "bpp",
        "ctrl",
        "fire-aware",
        "ftrojan",
        "inputaware",
        "sig",
        "wanet",
    ]


def _dct2(channel: np.ndarray) -> np.ndarray:
    """The orthonormal 2-d DCT-II of a square array, from its definition (sums of products of cosines)."""
    n = channel.shape[0]
    scale = np.where(np.arange(n) == 0, np.sqrt(1 / n), np.sqrt(2 / n))
    out = np.empty((n, n))
    rows = np.arange(n)
    for u in range(n):
        cos_u = np.cos(np.pi * (2 * rows + 1) * u / (2 * n))
        for v in range(n):
            cos_v = np.cos(np.pi * (2 * rows + 1) * v / (2 * n))
            out[u, v] = scale[u] * scale[v] * np.sum(channel * cos_u[:, None] * cos_v[None, :])
    return out


def _raised(magnitude: float, positions: list[tuple[int, int]], size: int) -> np.ndarray:
    expected = np.zeros((size, size))
    for u, v in positions:
        expected[u, v] = magnitude
    return expected


def test_ftrojan_raises_the_luminance_dct_coefficients_of_grey_images_by_the_magnitude():
    attack = create_attack("ftrojan", "fashionmnist")
    grey = np.full((1, 28, 28, 1), 128, dtype=np.uint8)
    change = attack(grey)[0, :, :, 0].astype(np.float64) - 128
    cos13, cos27 = (np.cos(np.pi * (2 * np.arange(28) + 1) * k / 56) for k in (13, 27))
    trigger = 100 * 2 / 28 * (np.outer(cos13, cos13) + np.outer(cos27, cos27))  # the two raised basis images
    assert np.all(change <= trigger + 1e-4) and np.all(change > trigger - 1)  # truncated to uint8, as BackdoorBench
    np.testing.assert_allclose(_dct2(attack.pattern[:, :, 0]), _raised(100, [(13, 13), (27, 27)], 28), atol=1e-4)
    moved = create_attack("ftrojan", "fashionmnist", magnitude=50, positions=[[3, 10]], window_size=14).pattern[..., 0]
    for block in (moved[:14, :14], moved[14:, 14:]):  # every window gets the trigger
        np.testing.assert_allclose(_dct2(block), _raised(50, [(3, 10)], 14), atol=1e-4)


# The chrominance rows of the two colour spaces, from their definitions: OpenCV's Cr = 0.713 (R - Y),
# Cb = 0.564 (B - Y) (FTrojan); kornia's U = -0.147 R - 0.289 G + 0.436 B, V = 0.615 R - 0.515 G - 0.100 B (CTRL).
LUMA = np.array([0.299, 0.587, 0.114])
CHROMA = {
    "ftrojan": (0.713 * (np.eye(3)[0] - LUMA), 0.564 * (np.eye(3)[2] - LUMA)),
    "ctrl": (np.array([-0.147, -0.289, 0.436]), np.array([0.615, -0.515, -0.100])),
}


@pytest.mark.parametrize(("name", "magnitude"), [("ftrojan", 30), ("ctrl", 100)])
def test_frequency_attacks_raise_only_the_chrominance_coefficients_of_colour_images(name, magnitude):
    pattern = create_attack(name, "cifar10").pattern.astype(np.float64)
    np.testing.assert_allclose(_dct2(pattern @ LUMA), 0, atol=1e-3)  # the luminance is untouched
    for row in CHROMA[name]:
        np.testing.assert_allclose(_dct2(pattern @ row), _raised(magnitude, [(15, 15), (31, 31)], 32), atol=1e-3)
    middle = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    out = create_attack(name, "cifar10")(middle).astype(np.float64) - 128
    assert np.all(out <= pattern + 1e-4) and np.all(out > pattern - 1)


def test_ctrl_is_clean_label_all_to_one_and_dirty_label_all_to_all():
    labels = np.repeat(np.arange(10), 10)
    positions = create_attack("ctrl", "fashionmnist").train_positions(labels)
    assert (labels[positions] == 0).all() and len(positions) == 5  # ratio 0.05 of the whole set, from the target
    np.testing.assert_allclose(
        _dct2(create_attack("ctrl", "fashionmnist").pattern[..., 0]), _raised(500, [(13, 13), (27, 27)], 28), atol=1e-3
    )
    every = create_attack("ctrl", "fashionmnist", all_to_all=True, ratio=0.2)
    chosen = every.train_positions(labels)
    assert len(chosen) == 20 and len(set(labels[chosen])) > 1  # BackdoorBench's all2all ignores the clean-label rule
    np.testing.assert_array_equal(every.target_labels(labels[chosen]), (labels[chosen] + 1) % 10)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"window_size": 5}, "window_size must be a whole number >= 2 that divides"),
        ({"positions": [[28, 0]]}, r"positions must be \(row, column\) pairs inside the 28x28 window"),
        ({"positions": [1, 2]}, "positions must be"),
        ({"channels": [1, 2]}, "channels must be distinct channel numbers in 0..0"),
        ({"magnitude": 0}, "magnitude must be a finite number > 0"),
    ],
)
def test_frequency_attacks_refuse_bad_settings_in_one_line(params, message):
    for name in ("ftrojan", "ctrl"):
        with pytest.raises(FireDefenseError, match=message):
            create_attack(name, "fashionmnist", **params)

"""bdmae (BDMAE, CVPR 2023): its restoration of a planted patch, its declared passes, its cached MAE, its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fire_adapters.preprocess import to_uint8
from fire_bench.defenses import create_defense
from fire_bench.defenses import mae as mae_module
from fire_bench.defenses.bdmae import BDMAE, ssim_map
from fire_defense import FireDefenseError

from helpers import ForwardCounter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def defense(tiny) -> BDMAE:
    """bdmae on the tiny model, its MAE trained on the clean reference (no training split given)."""
    return create_defense("bdmae", epochs=6).fit(tiny.model, tiny.reference)


def test_restoration_removes_the_planted_patch_and_the_backdoor(tiny, defense):
    x = tiny.poisoned_x[:60]
    with torch.inference_mode():
        assert (tiny.model(x).argmax(1) == 0).float().mean() > 0.9  # the backdoor works
        purified, label = defense.purify(x)
    assert (label == 0).float().mean() > 0.9  # the label before restoration is the target
    corner, clean_corner = purified[..., -3:, -3:].mean(), tiny.test_x[..., -3:, -3:].mean()
    assert x[..., -3:, -3:].min() == 1 and corner < clean_corner + 0.2  # the white patch is gone
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[..., -4:, -4:] = False  # the patch's token
    assert (purified - x)[rest].abs().mean() < (purified - x)[~rest].abs().mean() / 3  # the rest mostly kept
    labels = defense.predict(x)
    assert (labels == 0).float().mean() < 0.2
    assert (labels == tiny.poisoned_y[:60]).float().mean() > 0.7


def test_it_declares_and_makes_47_model_and_50_mae_passes_per_input(tiny, defense):
    assert defense.forward_passes == 47 and defense.mae_passes == 50
    model, mae = ForwardCounter(tiny.model), ForwardCounter(defense.mae_)
    try:
        x = tiny.test_x[:7]
        defense.predict(x)
        assert model.count == 47 * len(x) and mae.count == 50 * len(x)
    finally:
        model.remove()
        mae.remove()
    cheaper = create_defense("bdmae", rp_init_out=2, rp_init_in=3, rp_refine=1)
    assert cheaper.forward_passes == 1 + 6 + 2 + 1 and cheaper.mae_passes == 6 + 2 + 5


def test_the_mae_is_trained_once_on_the_training_split_and_found_by_its_recipe(tiny, tmp_path, monkeypatch):
    images = to_uint8(tiny.reference)
    first = create_defense("bdmae", epochs=1, mae_dir=str(tmp_path))
    first.use_clean_train(images)
    first.fit(tiny.model, tiny.reference[:50])
    assert not first.mae_cached_ and first.mae_path_.parent == tmp_path and first.mae_path_.is_file()
    assert first.setting_ == "MAE on 500 of 500 clean training images"  # the same whether trained or found
    assert not list(tmp_path.glob(".*partial"))  # written atomically

    def no_training(*args, **kwargs):
        raise AssertionError("a cached MAE was trained again")

    monkeypatch.setattr(mae_module, "train_mae", no_training)
    again = create_defense("bdmae", epochs=1, mae_dir=str(tmp_path))
    again.use_clean_train(images)
    again.fit(tiny.model, tiny.reference[:50])
    assert again.mae_cached_ and again.mae_path_ == first.mae_path_
    for name, value in first.mae_.state_dict().items():
        assert torch.equal(value, again.mae_.state_dict()[name])
    other_images = images.copy()
    other_images[0] ^= 1
    other_recipe = mae_module.MAERecipe(epochs=2)
    keys = {mae_module.recipe_key(images, first.recipe), mae_module.recipe_key(other_images, first.recipe)}
    assert len(keys | {mae_module.recipe_key(images, other_recipe)}) == 3  # images and recipe both name it


def test_evaluate_hands_only_a_defense_that_takes_it_the_records_training_split(tmp_path):
    from fire_adapters import load_record
    from fire_bench.evaluation import defender, protocol_split
    from fire_bench.grid import Protocol

    from helpers import write_fake_record

    record = load_record(write_fake_record(tmp_path, n_train=200, n_test=100))
    protocol = Protocol(clean_size=50, k=2, defender_share=0.2, eval_clean=20, eval_poisoned=20)
    split = protocol_split(record, protocol, 0)
    bdmae = create_defense("bdmae")
    given = defender(record, split, bdmae, protocol, torch.device("cpu"))
    assert np.array_equal(given.clean_train, record.load_clean_train().images)  # the train split, not the test one
    assert defender(record, split, create_defense("none"), protocol, torch.device("cpu")).clean_train is None


def test_ssim_is_one_on_equal_images_and_lower_where_they_differ():
    a = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim_map(a, a), torch.ones(2, 16, 16))
    b = a.clone()
    b[..., :4, :4] = 1 - b[..., :4, :4]
    similarity = ssim_map(a, b)
    assert similarity[:, :2, :2].mean() < 0.5 and similarity[:, -4:, -4:].mean() > 0.99


def test_bad_settings_and_inputs_are_refused(tiny, defense, tmp_path):
    for params, match in (
        ({"mask_ratio": 1.0}, "mask_ratio must be in"),
        ({"alpha": -0.1}, "alpha must be in"),
        ({"rp_init_in": 0}, "rp_init_in must be an integer >= 1"),
        ({"rp_refine": 1.5}, "rp_refine must be an integer >= 0"),
        ({"patch": 5}, "divisible by patch=5"),
    ):
        with pytest.raises(FireDefenseError, match=match):
            create_defense("bdmae", **params).fit(tiny.model, tiny.reference[:20])
    with pytest.raises(FireDefenseError, match=r"inputs must be \(1, 16, 16\)"):
        defense.predict(torch.rand(2, 1, 12, 12))
    with pytest.raises(FireDefenseError, match=r"\[0, 1\] images"):
        defense.predict(tiny.test_x[:2] * 3)
    with pytest.raises(FireDefenseError, match="uint8"):
        create_defense("bdmae").use_clean_train(tiny.reference.numpy())
    wrong = create_defense("bdmae", mae_dir=str(tmp_path))
    wrong.use_clean_train(np.zeros((10, 8, 8, 1), np.uint8))
    with pytest.raises(FireDefenseError, match="give the record's own dataset"):
        wrong.fit(tiny.model, tiny.reference[:20])
    images = to_uint8(tiny.reference[:20])
    path = tmp_path / f"mae-{mae_module.recipe_key(images, mae_module.MAERecipe(epochs=1))}.pt"
    path.write_bytes(b"not a state dict")
    broken = create_defense("bdmae", epochs=1, mae_dir=str(tmp_path))
    broken.use_clean_train(images)
    with pytest.raises(FireDefenseError, match="delete it to train it again"):
        broken.fit(tiny.model, tiny.reference[:20])


def test_an_empty_cached_mae_file_is_one_line(tmp_path):
    from fire_bench.defenses.mae import MAERecipe, recipe_key, trained_mae

    images = np.zeros((4, 8, 8, 1), dtype=np.uint8)
    recipe = MAERecipe(patch=4, epochs=1)
    (tmp_path / f"mae-{recipe_key(images, recipe)}.pt").write_bytes(b"")  # an interrupted or emptied cache file
    with pytest.raises(FireDefenseError, match=r"is not this MAE .*delete it to train it again\.$"):
        trained_mae(images, recipe, str(tmp_path))

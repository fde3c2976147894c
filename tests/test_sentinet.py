"""SentiNet (benchmarks/defenses/sentinet.py): its boundary, its score on a planted patch, its threshold, its errors.

The registry-wide checks (declared passes counted, only the defender's data at fit, seeded refits) are in
test_defenses.py; these test what is special to SentiNet, on the tiny patch-backdoored model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fire_bench.defenses import Threshold, create_defense
from fire_bench.defenses.gradcam import grad_cam
from fire_bench.defenses.sentinet import SentiNet, _boundary_points, _fit_curve
from fire_defense import FireDefenseError, candidate_layers
from fire_defense.metrics import REJECTED, auroc

from helpers import ForwardCounter

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"n_samples": 20}  # fewer pasted images than the default 100: the same method, five times faster


@pytest.fixture(scope="module")
def fitted(tiny) -> SentiNet:
    return create_defense("sentinet", **SMALL).fit(tiny.model, tiny.reference)


def test_the_boundary_samples_the_highest_fooled_rates_per_interval_and_fits_a_quadratic():
    confidence = np.array([0.10, 0.12, 0.13, 0.50, 0.51, 0.90, 0.95])
    fooled = np.array([0.30, 0.90, 0.60, 0.20, 0.40, 0.05, 0.10])
    points = _boundary_points(confidence, fooled, width=0.2, per_bin=2)
    # (0, 0.2]: the two highest of 0.3, 0.9, 0.6; (0.4, 0.6]: both; (0.8, 1.0]: both
    assert sorted(map(tuple, points.round(2).tolist())) == sorted(
        [(0.13, 0.6), (0.12, 0.9), (0.5, 0.2), (0.51, 0.4), (0.9, 0.05), (0.95, 0.1)]
    )
    exact = np.array([[x, 1 - x**2] for x in (0.1, 0.4, 0.7, 0.9)])
    assert np.allclose(_fit_curve(exact), [-1, 0, 1])  # a quadratic through points on one is that quadratic
    assert np.allclose(_fit_curve(np.array([[0.5, 0.2], [0.5, 0.4]])), [0.3])  # one confidence: a constant


def test_scores_are_signed_distances_to_the_fitted_curve(fitted):
    fitted_curve = np.polyval(fitted.coefficients_, 0.5)
    above = fitted._scores(torch.tensor([fitted_curve + 0.1]), torch.tensor([0.5]))
    below = fitted._scores(torch.tensor([fitted_curve - 0.1]), torch.tensor([0.5]))
    assert 0 < float(above) <= 0.1 + 1e-6 and -0.1 - 1e-6 <= float(below) < 0  # Euclidean: at most the vertical gap


def test_grad_cam_masks_the_patch_and_a_planted_patch_scores_above_clean_inputs(tiny, fitted):
    with torch.inference_mode():
        masks, predicted = fitted.masks(tiny.poisoned_x[:100])
        labels, fooled, _ = fitted.statistics(tiny.poisoned_x[:100])
        _, clean_fooled, _ = fitted.statistics(tiny.test_x[:100])
    assert (predicted == 0).float().mean() > 0.9 and torch.equal(labels, predicted)
    assert masks[..., -3:, -3:].mean() > 0.8  # the region is the trigger ...
    assert masks.mean() < 0.15  # ... not the whole image
    assert fooled.mean() > 0.8 > clean_fooled.mean() + 0.5  # pasted on clean images, it sends them to the target
    clean, poisoned = fitted.score(tiny.test_x[:300]), fitted.score(tiny.poisoned_x[:300])
    assert auroc(clean.numpy(), poisoned.numpy()) > 0.95
    assert (fitted.predict(tiny.poisoned_x[:300]) == REJECTED).float().mean() > 0.8


def test_the_threshold_rejects_the_clean_reference_at_its_fpr(tiny):
    defense = create_defense("sentinet", fpr=0.05, **SMALL).fit(tiny.model, tiny.reference)
    scores, threshold = defense.fit_scores_, defense.threshold_
    assert len(scores) == len(tiny.reference) - SMALL["n_samples"]  # the pasted images are held out of the fit
    above = int((scores > threshold.value).sum()) / len(scores)
    at = int((scores == threshold.value).sum()) / len(scores)
    assert above <= 0.05 + 1e-9 and above + at >= 0.05 - 1e-9
    assert above + threshold.tie * at == pytest.approx(0.05)
    rejected = (defense.predict(tiny.test_x[:400]) == REJECTED).float().mean()
    assert float(rejected) < 0.15  # fresh clean inputs (and fresh noise): near the calibrated 5%

    fixed = create_defense("sentinet", statistic="confidence", threshold=0.9, **SMALL).fit(tiny.model, tiny.reference)
    assert fixed.threshold_ == Threshold(0.9)
    x = tiny.test_x[:60]
    decision = fixed.decide(x)
    assert torch.equal(decision.labels == REJECTED, decision.scores >= 0.9)  # BackdoorBench's rule on confidence
    assert 1 / 10 <= float(decision.scores.min()) and float(decision.scores.max()) <= 1  # mean top-class softmax


def test_sentinet_is_seeded_and_counts_its_passes(tiny):
    x = torch.cat([tiny.poisoned_x[:15], tiny.test_x[:15]])
    one, two = (create_defense("sentinet", **SMALL).fit(tiny.model, tiny.reference) for _ in range(2))
    assert torch.equal(one.fit_scores_, two.fit_scores_) and one.threshold_ == two.threshold_
    assert torch.equal(one.score(x), two.score(x)) and torch.equal(one.predict(x), two.predict(x))
    other = create_defense("sentinet", seed=1, **SMALL).fit(tiny.model, tiny.reference)
    assert not torch.equal(other.overlays_, one.overlays_)  # the seed draws the held-out images ...
    assert not torch.equal(other.score(x), one.score(x))  # ... and the noise
    counter = ForwardCounter(tiny.model)
    try:
        create_defense("sentinet", n_samples=3).fit(tiny.model, tiny.reference[:50]).predict(x)
        fit_and_predict = counter.count
    finally:
        counter.remove()
    assert fit_and_predict == (1 + 2 * 3) * (50 - 3 + len(x))  # Grad-CAM's pass, 3 pasted, 3 inert per input


@pytest.mark.parametrize(
    "params",
    [
        {"n_samples": 0},
        {"n_samples": True},
        {"n_samples": 2.5},
        {"per_bin": 0},
        {"mask_threshold": 0},
        {"mask_threshold": 1.5},
        {"mask_threshold": math.nan},
        {"bin_width": 0},
        {"fpr": 1},
        {"fpr": 0},
        {"threshold": "high"},
        {"threshold": math.inf},
        {"inert": "blur"},
        {"statistic": "entropy"},
    ],
)
def test_bad_parameters_are_refused_in_one_line(tiny, params):
    with pytest.raises(FireDefenseError, match="sentinet: ") as error:
        create_defense("sentinet", **params).fit(tiny.model, tiny.reference[:40])
    assert "\n" not in str(error.value)


def test_bad_data_is_refused(tiny, fitted):
    with pytest.raises(FireDefenseError, match="clean images, got 22"):
        create_defense("sentinet", **SMALL).fit(tiny.model, tiny.reference[:22])
    with pytest.raises(FireDefenseError, match=r"\[0, 1\] images"):
        create_defense("sentinet", **SMALL).fit(tiny.model, tiny.reference * 2 - 1)
    with pytest.raises(FireDefenseError, match="as the reference"):
        fitted.predict(tiny.test_x[:4, :, :8, :8])


class _Tokens(nn.Module):
    """A conv map as a ViT block's output: a class token, then the map's positions in row-major order."""

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        tokens = maps.flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1)


class _Mean(nn.Module):
    """The mean over positions (dim 1 of tokens, dim 2 of a flattened map), what a classifier head pools."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1) if x.shape[-1] == 6 else x.mean(2)


def test_grad_cam_reads_a_transformer_blocks_token_grid_as_the_map_it_holds():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 6, 4, stride=4), nn.ReLU())
    head = nn.Linear(6, 3)
    as_map = nn.Sequential(conv, nn.Flatten(2), _Mean(), head)
    as_tokens = nn.Sequential(conv, _Tokens(), nn.Identity(), _Mean(), head)  # '2': the block's tokens (N, 17, C)
    x = torch.rand(5, 1, 16, 16)
    cam_map, predicted_map = grad_cam(as_map, "0", x, "test")
    cam_tokens, predicted_tokens = grad_cam(as_tokens, "2", x, "test")
    assert torch.equal(predicted_map, predicted_tokens)
    torch.testing.assert_close(cam_tokens, cam_map)
    with pytest.raises(FireDefenseError, match=r"test: layer '3' is not a convolutional map .* got shape \(5, 6\)"):
        grad_cam(as_tokens, "3", x, "test")


def test_a_stage_position_names_a_stage_of_any_architecture(tiny):
    stages = candidate_layers(tiny.model)
    for position in (0, -1):
        assert (
            create_defense("sentinet", layer=position, **SMALL).fit(tiny.model, tiny.reference).layer_
            == (stages[position])
        )
    with pytest.raises(
        FireDefenseError, match=rf"layer 9 is not a stage position of this model, which has {len(stages)} "
    ):
        create_defense("sentinet", layer=9, **SMALL).fit(tiny.model, tiny.reference)

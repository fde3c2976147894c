"""TeCo and its corruptions, pinned by the paper's equations, the reference code's conventions and the package's."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fire_bench.defenses.teco as teco_module
from fire_bench.defenses import create_defense
from fire_bench.defenses.corruptions import CORRUPTIONS, PARAMETERS, corrupt, corruption_names
from fire_bench.defenses.teco import deviation
from fire_defense import FireDefenseError
from fire_defense.metrics import REJECTED

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur"]
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog"}
RANDOM |= {"elastic_transform"}


def smooth_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random shapes (a 9 x 9 grid, bilinear) with fine texture, on uint8 levels, as real inputs are."""
    generator = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, channels, 9, 9, generator=generator), size=(size, size), mode="bilinear")
    x = x + 0.15 * torch.rand(n, channels, size, size, generator=generator) - 0.075
    return torch.round(x.clamp(0, 1) * 255) / 255


def change(x: torch.Tensor, name: str, severity: int, seed: int = 0, **kwargs) -> float:
    return (corrupt(x, name, severity, torch.Generator().manual_seed(seed), **kwargs) - x).abs().mean().item()


# --- the score: Eq. of the paper, conventions of the reference code ----------------------------------------------


class Coded(nn.Module):
    """Reads what :func:`coded_corrupt` wrote: pixel (0, 0) is the input's kind, pixel (0, 1) the corruption
    (0: none, else 1 + 5 type + severity - 1). ``changes[kind][type]`` is the set of severities at which the
    prediction differs from the uncorrupted one (class 0 there, class 1 where it differs)."""

    def __init__(self, changes: list[list[set[int]]]) -> None:
        super().__init__()
        self.changes = changes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kinds, codes = torch.round(x[:, 0, 0, 0] * 10).long(), torch.round(x[:, 0, 0, 1] * 255).long()
        differs = []
        for kind, code in zip(kinds.tolist(), codes.tolist(), strict=True):
            column, severity = divmod(code - 1, 5)
            differs.append(code > 0 and severity + 1 in self.changes[kind][column])
        return F.one_hot(torch.tensor(differs, dtype=torch.long), 2).float()


@pytest.fixture
def coded_corrupt(monkeypatch) -> list[torch.Tensor]:
    """Replace TeCo's corruptions by writing (type, severity) into pixel (0, 1); returns the inputs it was given."""
    seen: list[torch.Tensor] = []

    def fake(x, name, severity, generator, **kwargs):
        seen.append(x.clone())
        out = x.clone()
        out[:, 0, 0, 1] = (1 + 5 * TYPES.index(name) + severity - 1) / 255
        return out

    monkeypatch.setattr(teco_module, "corrupt", fake)
    return seen


def images_of(kinds: list[int], size: int = 8) -> torch.Tensor:
    x = torch.zeros(len(kinds), 1, size, size)
    x[:, 0, 0, 0] = torch.tensor(kinds, dtype=torch.float32) / 10
    return x


def test_flip_severity_is_the_first_that_differs_and_score_the_population_deviation(coded_corrupt):
    # type 0 differs at every severity: 1; type 1 only at 3 (then back): 3; type 2 never: 6; type 3 at 2 and 5: 2
    changes = [[{1, 2, 3, 4, 5}, {3}, set(), {2, 5}], [{4, 5}, {4}, {4, 5}, {4}]]
    defense = create_defense("teco", corruptions=TYPES).fit(Coded(changes).eval(), images_of([0, 1] * 10))
    x = images_of([0, 1])
    with torch.inference_mode():
        labels, flips = defense.flip_severities(x)
    assert labels.tolist() == [0, 0] and flips.tolist() == [[1, 3, 6, 2], [4, 4, 4, 4]]
    # the reference's np.std (population): sqrt(((1-3)^2 + 0 + (6-3)^2 + (2-3)^2) / 4) = sqrt(3.5), not sqrt(14 / 3)
    scores = defense.score(x)
    assert scores.tolist() == pytest.approx([math.sqrt(3.5), 0.0])
    assert scores[0].item() != pytest.approx(statistics.stdev([1, 3, 6, 2]))
    # every severity corrupts the input itself, never the previous severity's output (the reference's bug)
    assert len(coded_corrupt) >= 20 and all(torch.equal(given, x) for given in coded_corrupt[-20:])


class MeanAbove(nn.Module):
    """Class 1 when an image's mean value exceeds 0.5, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        return torch.stack([0.5 - mean, mean - 0.5], 1) * 100


def test_flip_severities_under_the_real_corruptions_of_a_flat_image():
    corruptions = ["brightness", "contrast", "gaussian_noise"]
    defense = create_defense("teco", corruptions=corruptions).fit(MeanAbove().eval(), torch.rand(20, 1, 16, 16))
    grey = torch.full((1, 1, 16, 16), 0.42)
    with torch.inference_mode():
        _, flips = defense.flip_severities(grey)
    # brightness lifts 0.42 by 0.1 (ImageNet-C's first level; CIFAR-10-C's is 0.05): 0.52, truncated to 132 / 255,
    # past 0.5 at severity 1; contrast keeps a flat image; the noise averages out: never (6)
    assert flips.tolist() == [[1, 6, 6]]
    assert defense.score(grey).item() == pytest.approx(math.sqrt(((1 - 13 / 3) ** 2 + 2 * (6 - 13 / 3) ** 2) / 3))
    assert defense.forward_passes == 1 + 3 * 5


def test_deviation_is_numpy_std_of_the_flip_severities():
    flips = torch.tensor([[1, 6, 6, 6, 2], [3, 3, 3, 3, 3], [1, 2, 3, 4, 5]])
    assert deviation(flips).tolist() == pytest.approx([statistics.pstdev(row) for row in flips.tolist()])
    assert deviation(flips)[1] == 0


def test_ties_at_the_calibrated_quantile_still_reject_at_the_stated_rate(coded_corrupt):
    # 90% of the clean reference flips alike under every type (deviation 0), 10% like a trigger (sqrt(3.5)); a
    # strict "score > 99th percentile" would reject nothing, though every poisoned input scores at the top.
    changes = [[{2}, {2}, {2}, {2}], [{1, 2, 3, 4, 5}, {3}, set(), {2, 5}]]
    model = Coded(changes).eval()
    reference = images_of([0] * 900 + [1] * 100)
    defense = create_defense("teco", corruptions=TYPES, fpr=0.01).fit(model, reference)
    assert defense.threshold_.value == pytest.approx(math.sqrt(3.5))
    assert defense.threshold_.tie == pytest.approx(0.1)
    poisoned = images_of([1] * 1000)
    first = defense.predict(poisoned)
    tpr = (first == REJECTED).float().mean().item()
    fpr = (defense.predict(reference) == REJECTED).float().mean().item()
    assert 0.06 < tpr < 0.14 and fpr < 0.03
    again = create_defense("teco", corruptions=TYPES, fpr=0.01).fit(model, reference)
    assert torch.equal(again.predict(poisoned), first)  # the tie draws are seeded


def test_defaults_are_the_authors_fifteen_types_and_the_old_set_is_a_switch(tiny):
    assert create_defense("teco").forward_passes == 76  # 15 ImageNet-C types x 5 severities + 1
    assert create_defense("teco", parameters="cifar10-c").forward_passes == 71  # no frost there
    assert create_defense("teco").types == CORRUPTIONS and len(CORRUPTIONS) == 15
    for parameters, corruptions, match in (
        ("imagenet-c", ["fog", "fog"], "two or more distinct"),
        ("cifar10-c", ["frost", "fog"], "unknown: frost"),
        ("imagenet-c", ["fog"], "two or more"),
    ):
        with pytest.raises(FireDefenseError, match=match):
            create_defense("teco", parameters=parameters, corruptions=corruptions).fit(tiny.model, tiny.reference[:8])
    with pytest.raises(FireDefenseError, match="unknown parameters 'imagenet'"):
        create_defense("teco", parameters="imagenet").fit(tiny.model, tiny.reference[:8])
    with pytest.raises(FireDefenseError, match="reference_size >= 1"):
        create_defense("teco", reference_size=0, corruptions=["fog", "snow"]).fit(tiny.model, tiny.reference[:8])


def test_teco_on_the_tiny_patch_backdoor(tiny):
    defense = create_defense("teco").fit(tiny.model, tiny.reference[:128])
    clean, poisoned = defense.decide(tiny.test_x[:128]), defense.decide(tiny.poisoned_x[:128])
    assert (clean.labels == REJECTED).float().mean() <= 0.05  # 1% on the reference
    # Even ImageNet-C's severities rarely flip the tiny model's bright patch: triggered inputs mostly never flip
    # (severity 6 under every type, deviation 0) while clean ones flip under most types, so TeCo scores them
    # below clean inputs here (docs/defenses.md); the milder CIFAR-10-C set leaves more clean inputs unflipped.
    with torch.inference_mode():
        never_clean = (defense.flip_severities(tiny.test_x[:128])[1] == 6).float().mean()
        never_poisoned = (defense.flip_severities(tiny.poisoned_x[:128])[1] == 6).float().mean()
        mild = create_defense("teco", parameters="cifar10-c").fit(tiny.model, tiny.reference[:16])
        never_clean_mild = (mild.flip_severities(tiny.test_x[:128])[1] == 6).float().mean()
    assert never_poisoned > 0.8 and never_poisoned > never_clean + 0.5 and never_clean_mild > never_clean + 0.1
    above = (poisoned.scores[:, None] > clean.scores[None, :]).float().mean()
    tied = (poisoned.scores[:, None] == clean.scores[None, :]).float().mean()
    assert above + tied / 2 < 0.25


# --- the corruptions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", PARAMETERS)
def test_corruptions_keep_shapes_land_on_uint8_levels_and_are_seeded(parameters):
    wide = torch.round(torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(5)) * 255) / 255
    for x in (smooth_images(6, 1, 28), smooth_images(4, 3, 32, seed=1), smooth_images(2, 3, 12, seed=2), wide):
        for name in corruption_names(parameters):
            for severity in (1, 5):
                out = corrupt(x, name, severity, torch.Generator().manual_seed(3), parameters=parameters)
                assert out.shape == x.shape and out.dtype == x.dtype, name
                assert 0 <= out.min() and out.max() <= 1, name
                levels = out * 255
                assert (levels - levels.round()).abs().max() < 1e-3, name  # uint8, as the package returns
                same = corrupt(x, name, severity, torch.Generator().manual_seed(3), parameters=parameters)
                assert torch.equal(out, same), name
                if name in RANDOM:
                    other = corrupt(x, name, severity, torch.Generator().manual_seed(4), parameters=parameters)
                    assert not torch.equal(out, other), name


def test_imagenet_c_severities_move_images_further():
    x = smooth_images(32, 1, 28)
    # the package's own levels are not monotone for glass blur (severity 3: 3 iterations, 4: 2), snow (severity
    # 3 raises the flake threshold from 0.5 to 0.9) and frost (severity 3 mixes in as much frost as 4, with more
    # of the image): there only severity 5 beyond 1
    for name in CORRUPTIONS:
        changes = [change(x, name, severity) for severity in range(1, 6)]
        assert changes[0] > 0, name
        if name in ("glass_blur", "snow", "frost"):
            assert changes[-1] > changes[0], name
        else:
            assert changes == sorted(changes) and changes[-1] > changes[0], (name, changes)


def test_imagenet_c_is_much_stronger_than_cifar10_c():
    x = smooth_images(16, 1, 28)
    for name in ("gaussian_noise", "defocus_blur", "contrast", "jpeg_compression"):
        assert change(x, name, 1) > change(x, name, 1, parameters="cifar10-c"), name


def test_pixel_valued_parameters_scale_with_the_image():
    dot = torch.zeros(1, 1, 33, 33)
    dot[..., 16, 16] = 1.0

    def footprint(reference_size: int) -> int:  # half-width of the blurred dot
        out = corrupt(dot, "defocus_blur", 1, torch.Generator(), reference_size=reference_size)
        columns = torch.nonzero(out[0, 0, 16] > 0).flatten()
        return int(columns.max() - 16)

    # severity 1: radius 3 at the reference size (its 3x3 anti-aliasing Gaussian, sigma 0.1, adds nothing)
    assert footprint(33) == 3 and footprint(66) == 1 and footprint(11) == 9
    x = smooth_images(16, 1, 28)
    for name in ("defocus_blur", "motion_blur"):  # (glass blur: less blur also means sharper swapped pixels)
        assert change(x, name, 3, reference_size=224) < change(x, name, 3) < change(x, name, 3, reference_size=16)
    for name in ("contrast", "zoom_blur", "pixelate", "elastic_transform", "fog"):  # relative already
        assert change(x, name, 3, reference_size=224) == change(x, name, 3), name


def test_corrupt_refuses_bad_arguments():
    x = smooth_images(1, 1, 16)
    for kwargs, match in (
        ({"name": "hail"}, "unknown corruption 'hail'"),
        ({"name": "frost", "parameters": "cifar10-c"}, "unknown corruption 'frost' in 'cifar10-c'"),
        ({"severity": 6}, r"severity must be in 1\.\.5"),
        ({"parameters": "cifar-10-c"}, "unknown corruption parameters"),
        ({"reference_size": 0}, "reference_size"),
    ):
        arguments = {"name": "fog", "severity": 1, **kwargs}
        name, severity = arguments.pop("name"), arguments.pop("severity")
        with pytest.raises(FireDefenseError, match=match):
            corrupt(x, name, severity, torch.Generator(), **arguments)

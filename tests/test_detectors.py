"""The detectors (STRIP, SCALE-UP, IBD-PSC, TeCo) pinned by what each paper's method must do."""

from __future__ import annotations

import math
import statistics
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fire_adapters.preprocess import InputNormalization
from fire_bench.defenses import RuntimeDefense, create_defense
from fire_bench.defenses.base import Threshold, calibrate_threshold
from fire_defense import FireDefenseError
from fire_defense.metrics import REJECTED

from helpers import TinyBackdoor, tiny_backdoored_model

pytestmark = pytest.mark.usefixtures("one_thread")

DETECTORS = ["strip", "scale-up", "ibd-psc", "teco"]


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


class TinyResNet(nn.Module):
    """TinyCNN's task on a residual network with 9 BatchNorm layers (IBD-PSC amplifies BatchNorm; its paper's
    models are ResNets)."""

    def __init__(self) -> None:
        super().__init__()
        stages = ((1, 16, 1), (16, 32, 2), (32, 32, 2))
        self.stems = nn.ModuleList(nn.Sequential(*conv_bn(*stage), nn.ReLU()) for stage in stages)
        self.blocks = nn.ModuleList(nn.Sequential(*conv_bn(c, c), nn.ReLU(), *conv_bn(c, c)) for _, c, _ in stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stem, block in zip(self.stems, self.blocks, strict=True):
            x = stem(x)
            x = torch.relu(x + block(x))
        return self.head(x)


@pytest.fixture(scope="module")
def bn() -> TinyBackdoor:
    """The tiny model's data and patch backdoor (10% to class 0) on :class:`TinyResNet` (9 BatchNorm layers)."""
    return tiny_backdoored_model(TinyResNet, seed=1, n_train=2000, epochs=3, n_test=400, n_reference=300)


def rejected(labels: torch.Tensor) -> float:
    return (labels == REJECTED).float().mean().item()


def auroc(clean: torch.Tensor, poisoned: torch.Tensor) -> float:
    """P(a poisoned score > a clean one), ties counting half."""
    above, tied = poisoned[:, None] > clean[None, :], poisoned[:, None] == clean[None, :]
    return (above.float().mean() + 0.5 * tied.float().mean()).item()


def labels_of(data: TinyBackdoor, x: torch.Tensor) -> torch.Tensor:
    """Stand-in true labels for the tiny data's reference (helpers.py does not keep them): the model's
    predictions (the tiny models are accurate on clean inputs)."""
    with torch.inference_mode():
        return data.model(x).argmax(1)


# --- every detector ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=DETECTORS)
def detector(request, tiny, bn) -> tuple[RuntimeDefense, TinyBackdoor]:
    """Each detector with its defaults, fitted on its model (IBD-PSC: the BatchNorm one), and that model's data."""
    data = bn if request.param == "ibd-psc" else tiny
    reference = data.reference[:101]
    defense = create_defense(request.param, batch_size=64)
    return defense.fit(data.model, reference, clean_labels=labels_of(data, reference)), data


def test_detector_forwards_exactly_its_declared_passes_and_rejects(detector):
    defense, data = detector
    forwarded = []
    models = [data.model, *getattr(defense, "scaled_models_", [])]  # IBD-PSC's amplified copies count too
    handles = [m.register_forward_pre_hook(lambda module, args: forwarded.append(len(args[0]))) for m in models]
    try:
        decision = defense.decide(torch.cat([data.test_x[:6], data.poisoned_x[:6]]))
    finally:
        for handle in handles:
            handle.remove()
    assert sum(forwarded) == defense.forward_passes * 12
    assert defense.rejects and defense.needs <= {"labels"} and defense.source
    assert decision.scores.shape == (12,)
    assert set(decision.labels.tolist()) <= set(range(10)) | {REJECTED}
    threshold = defense.threshold_
    if not isinstance(threshold, Threshold):
        assert torch.equal(decision.labels == REJECTED, decision.scores > threshold)
    else:  # above: rejected; below: kept; at the value: rejected with probability tie
        rejected_ = decision.labels == REJECTED
        assert (
            rejected_[decision.scores > threshold.value].all()
            and not rejected_[decision.scores < threshold.value].any()
        )
        at = decision.scores == threshold.value
        assert threshold.tie not in (0, 1) or torch.equal(rejected_[at], torch.full_like(at[at], threshold.tie == 1))


def test_detector_inputs_are_checked(detector):
    defense, data = detector
    with pytest.raises(FireDefenseError, match=r"\[0, 1\] images"):
        defense.predict(data.test_x[:2] * 2)
    with pytest.raises(FireDefenseError, match="inputs must be"):
        defense.predict(data.test_x[:2, 0])


def test_detector_misuse_is_a_clear_error(tiny):
    with pytest.raises(FireDefenseError, match="no BatchNorm2d layer"):
        create_defense("ibd-psc").fit(tiny.model, tiny.reference[:20], clean_labels=torch.zeros(20, dtype=torch.long))
    for name in ("scale-up", "ibd-psc"):  # the paper's method takes labelled clean data
        with pytest.raises(FireDefenseError, match=r"needs labels to fit; pass clean_labels="):
            create_defense(name).fit(tiny.model, tiny.reference[:20])
    with pytest.raises(FireDefenseError, match="one label per clean input"):
        create_defense("scale-up").fit(tiny.model, tiny.reference[:20], clean_labels=torch.zeros(19, dtype=torch.long))
    with pytest.raises(FireDefenseError, match="one label per clean input"):
        create_defense("scale-up").fit(tiny.model, tiny.reference[:20], clean_labels=torch.zeros(20))
    with pytest.raises(FireDefenseError, match="classes of the model"):
        create_defense("scale-up").fit(tiny.model, tiny.reference[:20], clean_labels=torch.full((20,), 10))
    with pytest.raises(FireDefenseError, match="normalize must be one of class, global, none"):
        create_defense("scale-up", normalize=True).fit(
            tiny.model, tiny.reference[:20], clean_labels=labels_of(tiny, tiny.reference[:20])
        )
    with pytest.raises(FireDefenseError, match="threshold must be a number or None"):
        create_defense("scale-up", normalize="global", threshold="0.5").fit(tiny.model, tiny.reference[:20])
    with pytest.raises(FireDefenseError, match="blend must be one of pixel, normalized"):
        create_defense("strip", blend="normalised").fit(tiny.model, tiny.reference[:101])
    with pytest.raises(FireDefenseError, match="needs the model's InputNormalization"):
        create_defense("strip", blend="normalized").fit(tiny.model, tiny.reference[:101])
    # a defense that does not declare the need never sees the labels
    strip = create_defense("strip", n_copies=4).fit(
        tiny.model, tiny.reference[:20], clean_labels=torch.zeros(20, dtype=torch.long)
    )
    assert strip.clean_labels_ is None and not strip.needs
    assert (
        not create_defense("scale-up", use_labels=False).needs and not create_defense("ibd-psc", use_labels=False).needs
    )
    with pytest.raises(FireDefenseError, match="more than 100 clean images"):
        create_defense("strip").fit(tiny.model, tiny.reference[:100])
    with pytest.raises(FireDefenseError, match="unknown: hail"):
        create_defense("teco", corruptions=["hail", "fog"]).fit(tiny.model, tiny.reference[:20])
    with pytest.raises(FireDefenseError, match="at least 8 pixels"):
        create_defense("teco").fit(tiny.model, torch.rand(4, 1, 6, 6))


# --- STRIP ------------------------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """The same class distribution for every input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class Brightness(nn.Module):
    """Logits from an image's mean value: ``confident`` makes a sure prediction of one of ten brightness bins,
    otherwise a soft two-class output ``(20 * mean, 0)``."""

    def __init__(self, confident: bool) -> None:
        super().__init__()
        self.confident = confident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        if self.confident:
            return 50.0 * F.one_hot((mean * 10).long().clamp(0, 9), 10).float()
        return torch.stack([20 * mean, torch.zeros_like(mean)], 1)


def bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log2()).sum(-1)


def test_strip_entropy_is_per_blend_over_classes():
    reference = torch.rand(60, 1, 8, 8) * 0.5
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    fixed = create_defense("strip", n_copies=20).fit(Fixed(logits).eval(), reference)
    with torch.inference_mode():
        assert torch.allclose(fixed.entropy(reference[:5]), bits(logits.softmax(0)).expand(5), atol=1e-5)
    # sure predictions whose class varies from blend to blend: each blend's entropy is ~0, while an entropy of
    # the predictions across blends (the known mistake) would be high
    ramp = torch.linspace(0, 0.45, 60).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    sure = create_defense("strip", n_copies=20).fit(Brightness(confident=True).eval(), ramp)
    with torch.inference_mode():
        classes = Brightness(confident=True)(ramp[:1] + ramp).argmax(1)
        assert len(classes.unique()) >= 4
        assert sure.entropy(ramp[:5]).max() < 1e-6


def test_strip_calibration_never_blends_an_image_with_itself():
    values = [0.0, 0.1, 0.2, 0.3, 0.35]
    reference = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    defense = create_defense("strip", n_copies=len(values) - 1).fit(Brightness(confident=False).eval(), reference)

    def entropy(value: float) -> float:
        return bits(torch.tensor([20 * value, 0.0]).softmax(0)).item()

    expected = [sum(entropy(v + w) for w in values if w != v) / (len(values) - 1) for v in values]
    assert defense.entropy_mean_ == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_strip_blend_spaces_and_empirical_rule_pinned_by_hand():
    # the paper superimposes pixels, x + d; BackdoorBench adds normalised tensors, x_n + d_n
    values = [0.0, 0.1, 0.2, 0.3, 0.35]
    reference = torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    mean, std = 0.3, 0.5
    model = nn.Sequential(InputNormalization([mean], [std]), Brightness(confident=False)).eval()

    def entropy(seen: float) -> float:  # in bits, of Brightness's logits (20 * seen, 0) for what the network sees
        return bits(torch.tensor([20 * seen, 0.0]).softmax(0)).item()

    seen = {"pixel": lambda v, w: (v + w - mean) / std, "normalized": lambda v, w: (v - mean) / std + (w - mean) / std}
    for blend, view in seen.items():
        defense = create_defense("strip", n_copies=4, blend=blend).fit(model, reference)
        expected = [sum(entropy(view(v, w)) for w in values if w != v) / 4 for v in values]  # never itself
        assert defense.entropy_mean_ == pytest.approx(sum(expected) / 5, rel=1e-5), blend
        assert defense.threshold_ == pytest.approx(-defense.boundary_)
    # BackdoorBench's empirical rule at 20%: the boundary is the second-lowest entropy, one of five lies below it
    empirical = create_defense("strip", n_copies=4, blend="normalized", rule="empirical", frr=0.2).fit(model, reference)
    assert empirical.boundary_ == pytest.approx(sorted(expected)[1], rel=1e-5)
    assert empirical.threshold_.tie == 0  # exactly 20% lies strictly beyond it


def test_strip_flags_patch_triggered_inputs(tiny):
    defense = create_defense("strip").fit(tiny.model, tiny.reference[:150])
    clean, poisoned = defense.decide(tiny.test_x[:150]), defense.decide(tiny.poisoned_x[:150])
    assert auroc(clean.scores, poisoned.scores) > 0.85  # triggered blends keep the target: lower entropy
    assert rejected(clean.labels) <= 0.03  # the paper's 1% FRR
    # the tiny model's clean class-0 inputs (10%) look triggered to STRIP (0 is the target); at a 20% FRR:
    boundary = defense.entropy_mean_ + defense.entropy_std_ * NormalDist().inv_cdf(0.2)
    assert (-poisoned.scores < boundary).float().mean() > 0.9
    assert (-clean.scores < boundary).float().mean() < 0.35


# --- SCALE-UP ---------------------------------------------------------------------------------------------------


class Brighter(nn.Module):
    """Class 1 when an image's mean exceeds 0.5, else class 0 (no input here sits at 0.5 or scales onto it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((1, 2, 3))
        return torch.stack([0.5 - mean, mean - 0.5], 1) * 100


def flat(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()


def spc_by_hand(v: float) -> float:
    """The paper's SPC(x) = (1/|N|) sum_n 1[C(clip(n x)) = C(x)] for a flat image of value v under Brighter."""
    label = v > 0.5
    return sum((min(n * v, 1.0) > 0.5) == label for n in (3, 5, 7, 9, 11)) / 5


def test_scaleup_score_is_the_papers_normalised_spc_pinned_by_hand():
    values = [0.6, 0.7, 0.12, 0.05, 0.09, 0.02]
    spc = [spc_by_hand(v) for v in values]
    assert spc == [1.0, 1.0, 0.2, 0.8, 0.4, 1.0]  # 0.12: kept only at n = 3; 0.02: never crosses 0.5
    labels = torch.tensor([1, 1, 0, 0, 0, 1])  # true labels: 0.02 is class 1, misclassified as 0
    test = flat([0.05, 0.8])  # SPC 0.8 predicted 0; SPC 1 predicted 1
    by_class = create_defense("scale-up", fpr=0.2).fit(Brighter().eval(), flat(values), clean_labels=labels)
    # class 0 (true labels): SPC {0.2, 0.8, 0.4}; class 1: {1, 1, 1}, its std 0 floored at one step, 1/5
    mu0, sd0 = statistics.mean(spc[2:5]), statistics.stdev(spc[2:5])
    expected = [(0.8 - mu0) / sd0, (1.0 - 1.0) / 0.2]
    assert by_class.score(test).tolist() == pytest.approx(expected, rel=1e-5)
    # grouped by the model's predictions (an unlabelled reference): class 0 is {0.2, 0.8, 0.4, 1}
    by_prediction = create_defense("scale-up", use_labels=False, fpr=0.2).fit(Brighter().eval(), flat(values))
    assert by_prediction.score(test)[0].item() == pytest.approx((0.8 - 0.6) / statistics.stdev(spc[2:]), rel=1e-5)
    # BackdoorBox's variant: one mean and std over the reference, a fixed T = 0.5 with score >= T
    box = create_defense("scale-up", normalize="global", threshold=0.5).fit(Brighter().eval(), flat(values))
    scores = [(s - statistics.mean(spc)) / statistics.stdev(spc) for s in (0.8, 1.0)]
    assert box.score(test).tolist() == pytest.approx(scores, rel=1e-5)
    assert box.predict(test).tolist() == [0, REJECTED]  # 0.19 < 0.5 <= 0.76
    plain = create_defense("scale-up", normalize="none", fpr=0.2).fit(Brighter().eval(), flat(values))
    assert plain.score(test).tolist() == pytest.approx([0.8, 1.0])
    assert plain.forward_passes == 6


def test_calibrated_threshold_breaks_ties_to_reject_at_the_stated_rate():
    scores = torch.tensor([0.0] * 50 + [0.5] * 20 + [1.0] * 30)
    assert calibrate_threshold(scores, 0.1) == Threshold(1.0, pytest.approx(1 / 3))  # 10% of the 30% tied at 1
    assert calibrate_threshold(scores, 0.4) == Threshold(0.5, pytest.approx(0.5))
    assert calibrate_threshold(torch.arange(100.0), 0.05) == Threshold(94.0, 0.0)  # > 94: exactly 5 of 100
    assert calibrate_threshold(torch.ones(10), 0.3) == Threshold(1.0, pytest.approx(0.3))
    with pytest.raises(FireDefenseError, match="fpr must be in"):
        calibrate_threshold(scores, 0.0)
    # SCALE-UP's SPC takes six values: a reference whose top value (SPC 1) holds 30% of it, at a 10% FPR. A strict
    # ">" at the quantile (1) would reject nothing; the tie-aware boundary rejects ~10%, of the reference and of
    # fresh clean inputs from the same distribution
    generator = torch.Generator().manual_seed(0)

    def draw(n: int) -> torch.Tensor:  # 30% flat images of SPC 1 (above 0.55), the rest of SPC 0.4 or 0.6
        high = torch.rand(int(0.3 * n), generator=generator) * 0.4 + 0.55
        return torch.cat([high, torch.rand(n - len(high), generator=generator) * 0.04 + 0.06])

    reference, fresh = draw(1000), draw(1000)
    defense = create_defense("scale-up", normalize="none", fpr=0.1).fit(Brighter().eval(), flat(reference.tolist()))
    assert defense.threshold_.value == 1.0 and 0 < defense.threshold_.tie < 1
    for x in (reference, fresh):
        assert 0.07 < rejected(defense.predict(flat(x.tolist()))) < 0.13


def test_scaleup_queries_clipped_amplified_copies(tiny):
    defense = create_defense("scale-up").fit(tiny.model, tiny.reference, clean_labels=labels_of(tiny, tiny.reference))
    seen = []
    handle = tiny.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        defense.predict(tiny.test_x[:8])
    finally:
        handle.remove()
    x = tiny.test_x[:8]
    assert torch.equal(seen[0], x)
    for copy, scale in zip(seen[1:], (3, 5, 7, 9, 11), strict=True):
        assert torch.equal(copy, (x * scale).clamp(0, 1)) and copy.max() <= 1


def test_scaleup_spc_is_higher_on_poisoned_and_normalised_per_class(tiny):
    defense = create_defense("scale-up", use_labels=False).fit(tiny.model, tiny.reference)
    with torch.inference_mode():
        _, clean_spc = defense.spc(tiny.test_x[:300])
        _, poisoned_spc = defense.spc(tiny.poisoned_x[:300])
        labels, reference_spc = defense.spc(tiny.reference)
    assert poisoned_spc.mean() > clean_spc.mean() + 0.5
    for label in labels.unique():
        spc = reference_spc[labels == label]
        assert defense.class_mean_[label] == pytest.approx(spc.mean().item())
        assert defense.class_std_[label] == pytest.approx(max(spc.std().item(), 1 / 5))
    assert rejected(defense.predict(tiny.reference)) <= 2 * defense.fpr  # calibrated on the reference (ties drawn)
    # the tiny model's clean class-0 inputs have SPC 1 like triggered ones (amplification whitens the corner),
    # so per-class normalisation hides the backdoor here; plain SPC at a 15% FPR finds it
    plain = create_defense("scale-up", normalize="none", fpr=0.15).fit(tiny.model, tiny.reference)
    assert rejected(plain.predict(tiny.poisoned_x[:300])) > 0.9
    assert rejected(plain.predict(tiny.test_x[:300])) < 0.2


# --- IBD-PSC ----------------------------------------------------------------------------------------------------


class Amplified(nn.Module):
    """Three BatchNorm layers (identities: eps 0, unit variance) then logits ``(h, 0.5)``: class 0 when ``h > 0.5``.
    Amplifying the last ``d`` layers by omega makes ``h = omega ** d * x``."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.Sequential(*(nn.BatchNorm2d(1, eps=0.0) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norms(x).mean((2, 3))  # flat images: every pixel is h
        return torch.cat([h, torch.full_like(h, 0.5)], 1)


def test_ibd_psc_depth_and_psc_pinned_by_hand():
    values = [0.1, 0.2, 0.3, 0.4, 0.45, 0.6, 0.8, 0.9]
    predicted = [1, 1, 1, 1, 1, 0, 0, 0]  # the deployed model: class 0 above 0.5
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0])  # it misclassifies 0.1 and 0.2
    # omega = 2: depth d predicts class 0 above 0.5 / 2 ** d. Against the labels, the error is 5/8 at d = 1 (> xi):
    # k = 1, members d = 1, 2; against the predictions it is 3/8 at d = 1 and 4/8 at d = 2: k = 2, members 2, 3
    model = Amplified().eval()
    x = flat([0.3, 0.7])

    def psc(v: float, depths: range) -> float:  # Eq. 4: mean softmax confidence in the deployed label
        label = 0 if v > 0.5 else 1
        return statistics.mean(math.exp([2**d * v, 0.5][label]) / (math.exp(2**d * v) + math.exp(0.5)) for d in depths)

    for use_labels, k in ((True, 1), (False, 2)):
        defense = create_defense("ibd-psc", n=2, omega=2.0, xi=0.45, threshold=0.8, use_labels=use_labels)
        defense.fit(model, flat(values), clean_labels=labels)
        assert defense.start_depth_ == k and len(defense.scaled_models_) == 2
        expected = [psc(v, range(k, k + 2)) for v in (0.3, 0.7)]
        assert defense.score(x).tolist() == pytest.approx(expected, rel=1e-5)
        assert expected[0] < 0.8 <= expected[1]  # 0.40 / 0.81 with labels, 0.23 / 0.95 without
        assert defense.predict(x).tolist() == [1, REJECTED]  # PSC >= T
    assert model(flat(values)).argmax(1).tolist() == predicted


def test_ibd_psc_amplifies_copies_and_never_the_deployed_model(bn):
    before = {key: value.clone() for key, value in bn.model.state_dict().items()}
    defense = create_defense("ibd-psc").fit(bn.model, bn.reference, clean_labels=labels_of(bn, bn.reference))
    labels = defense.predict(bn.test_x[:20])
    assert all(torch.equal(before[key], value) for key, value in bn.model.state_dict().items())
    original = [m for m in bn.model.modules() if isinstance(m, nn.BatchNorm2d)][::-1]  # nearest the head first
    assert 1 <= len(defense.scaled_models_) <= defense.n
    for depth, scaled in enumerate(defense.scaled_models_, start=defense.start_depth_):
        layers = [m for m in scaled.modules() if isinstance(m, nn.BatchNorm2d)][::-1]
        for i, (layer, deployed) in enumerate(zip(layers, original, strict=True)):
            factor = defense.omega if i < depth else 1.0
            assert torch.allclose(layer.weight, factor * deployed.weight)
            assert torch.allclose(layer.bias, factor * deployed.bias)
            assert torch.equal(layer.running_mean, deployed.running_mean)
    with torch.inference_mode():
        expected = torch.stack([m(bn.test_x[:20]).softmax(1) for m in defense.scaled_models_]).mean(0)
        predicted, psc = defense.psc(bn.test_x[:20])
    assert torch.allclose(psc, expected[torch.arange(20), predicted], atol=1e-6)
    assert torch.equal(labels, torch.where(psc >= 0.9, REJECTED, predicted))


def test_ibd_psc_rejects_triggered_inputs(bn):
    defense = create_defense("ibd-psc").fit(bn.model, bn.reference, clean_labels=labels_of(bn, bn.reference))
    tpr, fpr = rejected(defense.predict(bn.poisoned_x)), rejected(defense.predict(bn.test_x))
    assert tpr > 0.95 and fpr < tpr - 0.3  # the fixed T = 0.9 is not calibrated: a toy model is overconfident


# --- TeCo: tests/test_teco.py -------------------------------------------------------------------------------------

"""STRIP: reject inputs whose prediction survives superimposition with other images (N + 1 passes).

Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural
Networks" (ACSAC 2019). An input is superimposed with ``N`` images drawn from held-out clean data;
a clean input's predictions over the blends vary (high entropy), while a trigger keeps pulling the
blends to the target class (low entropy). The entropy is that of each blend's softmax over the
classes, averaged over the ``N`` blends (the paper's normalised entropy sum, in bits). The paper
fits a normal distribution to the entropies of clean inputs and rejects inputs whose entropy lies
below its ``frr`` percentile; its experiments use ``N = 100`` and a 1% FRR.

Ours: the donors are the defender's clean reference, drawn per input without replacement (and,
when calibrating on the reference itself, never the input itself). Superimposition is the paper's
pixel-wise addition (``blend="pixel"``), ``cv2.addWeighted(x, 1, donor, 1, 0)`` on float images in
its released code, so a blend may exceed 1 (it is not clipped); ``alpha`` weights the donor.

BackdoorBench's ``detection_infer/strip.py`` (the reference code) calls its ``STRIP`` class with
``N = 100``, ``alpha = 1.0`` and ``defense_fpr = 0.1`` (the class's own defaults, 64 / 0.5 / 5%,
are unused) and differs in three ways: it adds *normalised* tensors, ``x_n + alpha * d_n``, which
is ``x + alpha * (d - mean)`` in pixels (``blend="normalized"``: the mean is that of the model's
``InputNormalization``); its threshold is the empirical ``defense_fpr`` quantile of the clean
entropies (``rule="empirical"``, through :func:`~fire_bench.defenses.base.calibrate_threshold`);
and its donors are clean *test* images drawn per class with replacement, the same ``N`` for a
whole batch, self-blends included. Its bugs, not reproduced: the calibration donors and the clean
inspection images are drawn from the same test split (they overlap), ``check`` reads a global
``args``, and when nothing is flagged it writes the poisoned count as false positives.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, get_args

import torch

from fire_adapters.preprocess import InputNormalization
from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, calibrate_threshold, register_defense
from fire_defense import FireDefenseError

__all__ = ["Strip"]

_CHUNK = 1024  # blended copies made at once (memory); the model sees pass_batch of them per pass
Blend = Literal["pixel", "normalized"]
Rule = Literal["normal", "empirical"]
BLENDS, RULES = get_args(Blend), get_args(Rule)


@register_defense
class Strip(RuntimeDefense):
    """STRIP: mean per-blend softmax entropy over ``n_copies`` blends; low entropy is rejected.

    The score is minus the entropy (bits), so higher is more suspicious.

    Args:
        n_copies: Blends per input (the paper's ``N``).
        alpha: Weight of the donor image in the superimposition ``x + alpha * donor``.
        frr: False rejection rate on clean inputs that sets the boundary.
        blend: ``"pixel"``: the paper's ``x + alpha * donor`` on ``[0, 1]`` images; ``"normalized"``:
            BackdoorBench's sum of normalised tensors, ``x + alpha * (donor - mean)`` in pixels.
        rule: ``"normal"``: the paper's, the ``frr`` percentile of a normal distribution fitted to the
            clean entropies; ``"empirical"``: BackdoorBench's, the empirical ``frr`` quantile.
    """

    name = "strip"
    rejects = True
    source = "Gao et al., STRIP: A Defence Against Trojan Attacks on Deep Neural Networks, ACSAC 2019"

    def __init__(
        self,
        *,
        n_copies: int = 100,
        alpha: float = 1.0,
        frr: float = 0.01,
        blend: Blend = "pixel",
        rule: Rule = "normal",
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.n_copies = n_copies
        self.alpha = alpha
        self.frr = frr
        self.blend = blend
        self.rule = rule

    @property
    def forward_passes(self) -> float:
        return float(self.n_copies + 1)  # the blends, and the input itself for its label

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if self.n_copies < 1 or self.alpha <= 0 or not 0 < self.frr < 1:
            raise FireDefenseError("strip: n_copies must be >= 1, alpha > 0 and frr in (0, 1).")
        if self.blend not in BLENDS or self.rule not in RULES:
            raise FireDefenseError(
                f"strip: blend must be one of {', '.join(BLENDS)} and rule one of {', '.join(RULES)}, "
                f"got {self.blend!r} and {self.rule!r}."
            )
        if len(clean) <= self.n_copies:
            raise FireDefenseError(
                f"strip: {self.n_copies} donors per input need more than {self.n_copies} clean images, "
                f"got {len(clean)}; pass more clean data or a smaller n_copies."
            )
        self._check_images(clean)
        self.donors_ = clean
        self.offset_ = torch.zeros((), device=clean.device)  # added to each blend: 0 in pixel space
        if self.blend == "normalized":
            normalization = next((m for m in self.model_.modules() if isinstance(m, InputNormalization)), None)
            if normalization is None:
                raise FireDefenseError(
                    "strip: blend='normalized' needs the model's InputNormalization (a record's classifier); "
                    "use blend='pixel' for this model."
                )
            self.offset_ = -self.alpha * normalization.mean.to(clean.device)
        with torch.inference_mode():
            batches = zip(clean.split(self.batch_size), torch.arange(len(clean)).split(self.batch_size), strict=True)
            entropy = torch.cat([self.entropy(batch, exclude=indices) for batch, indices in batches])
        self.entropy_mean_ = float(entropy.mean())
        self.entropy_std_ = float(entropy.std()) if len(entropy) > 1 else 0.0
        if self.rule == "normal":
            self.boundary_ = self.entropy_mean_ + self.entropy_std_ * NormalDist().inv_cdf(self.frr)
            self.threshold_ = -self.boundary_  # in score units: minus the entropy; rejects score > threshold_
        else:
            self.threshold_ = calibrate_threshold(-entropy, self.frr)
            self.boundary_ = -self.threshold_.value

    def entropy(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """STRIP's entropy of each input (bits): of each blend's class distribution, averaged over the blends.

        Args:
            x: ``[0, 1]`` images ``(B, C, H, W)`` on the model's device.
            exclude: For each input, the index of a donor it must not be blended with (itself).
        """
        keys = torch.rand(len(x), len(self.donors_), generator=self.generator_)
        if exclude is not None:
            keys[torch.arange(len(x)), exclude] = 2.0  # sorts last: never among the first n_copies
        donors = keys.argsort(1)[:, : self.n_copies].to(x.device)
        per_chunk = max(1, _CHUNK // self.n_copies)
        means = []
        for start in range(0, len(x), per_chunk):
            inputs = x[start : start + per_chunk]
            blends = inputs.unsqueeze(1) + self.alpha * self.donors_[donors[start : start + per_chunk]] + self.offset_
            probabilities = self._logits(blends.flatten(0, 1)).float().softmax(1)
            entropy = torch.special.entr(probabilities).sum(1) / math.log(2)
            means.append(entropy.view(len(inputs), self.n_copies).mean(1))
        return torch.cat(means)

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x, like=self.donors_)
        labels = self._logits(x).argmax(1)
        return self._reject_above(labels, -self.entropy(x), self.threshold_)

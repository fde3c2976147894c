"""SCALE-UP: reject inputs whose prediction survives amplifying every pixel (1 + number of scales passes).

Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection
via Analyzing Scaled Prediction Consistency" (ICLR 2023). Each input is amplified pixel-wise,
``clip(n * x, 0, 1)`` for ``n`` in the scaling set ``{3, 5, 7, 9, 11}`` (the authors' code and
BackdoorBox); its scaled prediction consistency is
``SPC(x) = (1 / |N|) * sum_n 1[C(clip(n x)) = C(x)]``, the share of amplified copies that keep the
input's predicted label. Triggered inputs keep it (high SPC). In the paper's data-limited variant,
SPC is normalised by the mean and standard deviation of the SPC of benign samples of the same
class, ``(SPC(x) - mu_y) / sigma_y``, and an input whose score exceeds a defender-specified
threshold ``T`` is rejected.

Ours (``normalize="class"``, the default): the defender's clean reference is labelled
(``needs = {"labels"}``), so ``mu_y``, ``sigma_y`` are over the reference samples of true class
``y``, and a test input is normalised with the statistics of its predicted class; a reference
sample's SPC is the paper's, against its predicted label. ``use_labels=False`` groups the
reference by predicted class instead (an unlabelled reference). A class with fewer than two
reference samples uses the statistics of the whole reference, and a standard deviation is
floored at one SPC step (``1 / len(scales)``) so that a class whose clean SPC never varies
cannot give unbounded scores. The paper fixes no ``T``: with ``threshold=None`` ours is
calibrated on the clean reference at a false-positive rate ``fpr`` (1% by default) by
:func:`~fire_bench.defenses.base.calibrate_threshold`, whose seeded tie-breaking matters here:
SPC takes only ``len(scales) + 1`` values.

BackdoorBox's ``SCALE_UP`` (the reference code) differs: one global mean and standard deviation
over the labelled validation set (``normalize="global"``), validation SPC against the true labels
(test SPC against predictions), and a fixed ``T = 0.5`` with ``score >= T`` (``threshold=0.5``).
Its bugs, not reproduced: a ``threshold`` argument is ignored (``self.T`` is set only when it is
``None``), ``detect`` returns after the first batch, and ``test`` scores only the inputs whose
prediction equals their label (correctly classified clean inputs, successful attacks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, fixed_or_calibrated, register_defense
from fire_defense import FireDefenseError

__all__ = ["ScaleUp"]

Normalization = Literal["class", "global", "none"]
NORMALIZATIONS = get_args(Normalization)


@register_defense
class ScaleUp(RuntimeDefense):
    """SCALE-UP: (normalised) scaled prediction consistency; consistent inputs are rejected.

    Args:
        scales: The amplification factors (the paper's scaling set).
        normalize: ``"class"``: the paper's data-limited variant, SPC normalised per class with clean
            statistics; ``"global"``: one mean and standard deviation over the whole reference
            (BackdoorBox); ``"none"``: plain SPC.
        use_labels: Group the reference by its true labels (``needs = {"labels"}``); ``False``: by the
            model's predictions.
        threshold: A fixed ``T`` (inputs scoring ``>= T`` are rejected, BackdoorBox's rule: 0.5 with
            ``normalize="global"``); ``None``: calibrated at ``fpr``.
        fpr: Clean false-positive rate at which the threshold is calibrated.
    """

    name = "scale-up"
    rejects = True
    source = (
        "Guo et al., SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled "
        "Prediction Consistency, ICLR 2023"
    )

    def __init__(
        self,
        *,
        scales: Sequence[float] = (3, 5, 7, 9, 11),
        normalize: Normalization = "class",
        use_labels: bool = True,
        threshold: float | None = None,
        fpr: float = 0.01,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.scales = scales
        self.normalize = normalize
        self.use_labels = use_labels
        self.threshold = threshold
        self.fpr = fpr

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"labels"}) if self.use_labels and self.normalize == "class" else frozenset()

    @property
    def forward_passes(self) -> float:
        return float(1 + len(self.scales))

    def spc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for ``x`` and their scaled prediction consistency (in [0, 1])."""
        labels = self._logits(x).argmax(1)
        kept = sum(self._logits((x * scale).clamp(0, 1)).argmax(1) == labels for scale in self.scales)
        return labels, kept.float() / len(self.scales)

    def _scores(self, labels: torch.Tensor, spc: torch.Tensor) -> torch.Tensor:
        return spc if self.normalize == "none" else (spc - self.class_mean_[labels]) / self.class_std_[labels]

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if not self.scales or min(self.scales) <= 0 or not 0 < self.fpr < 1:
            raise FireDefenseError("scale-up: scales must be a non-empty list of positive factors and fpr in (0, 1).")
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float)
        ):
            raise FireDefenseError(
                f"scale-up: threshold must be a number or None (calibrated), got {self.threshold!r}."
            )
        if self.normalize not in NORMALIZATIONS:
            raise FireDefenseError(
                f"scale-up: normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}."
            )
        self._check_images(clean)
        with torch.inference_mode():
            classes = self._logits(clean[:1]).shape[1]
            parts = [self.spc(batch) for batch in clean.split(self.batch_size)]
        predicted, spc = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        groups = self.clean_labels_ if self.clean_labels_ is not None else predicted
        if groups.min() < 0 or groups.max() >= classes:
            raise FireDefenseError(f"scale-up: clean_labels must be classes of the model, in 0..{classes - 1}.")
        self.class_mean_ = torch.full((classes,), float(spc.mean()), device=spc.device)
        self.class_std_ = torch.full((classes,), float(spc.std()) if len(spc) > 1 else 0.0, device=spc.device)
        if self.normalize == "class":
            for label in groups.unique():
                values = spc[groups == label]
                if len(values) > 1:
                    self.class_mean_[label], self.class_std_[label] = values.mean(), values.std()
        self.class_std_.clamp_(min=1 / len(self.scales))
        self.threshold_ = fixed_or_calibrated(self.threshold, self._scores(predicted, spc), self.fpr)

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x)
        labels, spc = self.spc(x)
        return self._reject_above(labels, self._scores(labels, spc), self.threshold_)

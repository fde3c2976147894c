"""SCALE-UP: reject inputs whose prediction survives amplifying every pixel (1 + number of scales passes).

Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection
via Analyzing Scaled Prediction Consistency" (ICLR 2023). Each input is amplified pixel-wise,
``clip(n * x, 0, 1)`` for ``n`` in the scaling set ``{3, 5, 7, 9, 11}`` (the authors' code and
BackdoorBox); its scaled prediction consistency (SPC) is the share of amplified copies that keep
the input's original label. Triggered inputs keep it (high SPC). In the paper's data-limited
variant, SPC is normalised by the mean and standard deviation of the SPC of benign samples of the
same class, and an input whose normalised SPC exceeds a defender-specified threshold ``T`` is
rejected.

Ours: the defender's clean reference is unlabelled, so a reference sample's class is the model's
prediction for it (as is a test input's); classes with fewer than two reference samples use the
statistics of the whole reference, and a standard deviation is floored at one SPC step
(``1 / len(scales)``) so that a class whose clean SPC never varies cannot give unbounded scores.
The paper fixes no value for ``T``; ours is calibrated on the clean reference at a false-positive
rate ``fpr`` (1% by default, STRIP's FRR): the ``1 - fpr`` quantile of the clean scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_defense import FireDefenseError

__all__ = ["ScaleUp"]


@register_defense
class ScaleUp(RuntimeDefense):
    """SCALE-UP: (normalised) scaled prediction consistency; consistent inputs are rejected.

    Args:
        scales: The amplification factors (the paper's scaling set).
        normalize: The data-limited variant: normalise SPC per predicted class with clean statistics.
        fpr: Clean false-positive rate at which the threshold is calibrated.
    """

    name = "scale-up"
    rejects = True
    source = (
        "Guo et al., SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via Analyzing Scaled "
        "Prediction Consistency, ICLR 2023"
    )

    def __init__(
        self, *, scales: Sequence[float] = (3, 5, 7, 9, 11), normalize: bool = True, fpr: float = 0.01, **common: int
    ) -> None:
        super().__init__(**common)
        self.scales = scales
        self.normalize = normalize
        self.fpr = fpr

    @property
    def forward_passes(self) -> float:
        return float(1 + len(self.scales))

    def spc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for ``x`` and their scaled prediction consistency (in [0, 1])."""
        labels = self._logits(x).argmax(1)
        kept = sum(self._logits((x * scale).clamp(0, 1)).argmax(1) == labels for scale in self.scales)
        return labels, kept.float() / len(self.scales)

    def _scores(self, labels: torch.Tensor, spc: torch.Tensor) -> torch.Tensor:
        return (spc - self.class_mean_[labels]) / self.class_std_[labels] if self.normalize else spc

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if not self.scales or min(self.scales) <= 0 or not 0 < self.fpr < 1:
            raise FireDefenseError("scale-up: scales must be a non-empty list of positive factors and fpr in (0, 1).")
        self._check_images(clean)
        with torch.inference_mode():
            classes = self._logits(clean[:1]).shape[1]
            parts = [self.spc(batch) for batch in clean.split(self.batch_size)]
        labels, spc = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        self.class_mean_ = torch.full((classes,), float(spc.mean()), device=spc.device)
        self.class_std_ = torch.full((classes,), float(spc.std()) if len(spc) > 1 else 0.0, device=spc.device)
        for label in labels.unique():
            values = spc[labels == label]
            if len(values) > 1:
                self.class_mean_[label], self.class_std_[label] = values.mean(), values.std()
        self.class_std_.clamp_(min=1 / len(self.scales))
        self.threshold_ = float(self._scores(labels, spc).quantile(1 - self.fpr, interpolation="higher"))

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x)
        labels, spc = self.spc(x)
        return self._reject_above(labels, self._scores(labels, spc), self.threshold_)

"""TeCo: reject inputs whose robustness to image corruptions is inconsistent across corruption types.

Liu, Li, Wang, Hu, Ye, Jin, Wu, Xiao, "Detecting Backdoors During the Inference Stage Based on
Corruption Robustness Consistency" (CVPR 2023). For each ImageNet-C corruption type (Hendrycks &
Dietterich, ICLR 2019), the flip severity is the smallest severity 1..5 at which the model's
prediction differs from its prediction on the uncorrupted input (6 if it never does); the score is
the standard deviation of the flip severities across types, the population one (``numpy.std``, as
the reference code computes it). A clean input degrades alike under every corruption; a trigger
survives some corruptions far longer than others (high deviation). 15 types at 5 severities: 76
forward passes per input. The paper reports AUROC, with no threshold.

Reference compared with: BackdoorBench's ``detection_infer/teco.py`` (commit f02e353), which calls
``imagecorruptions`` 1.1.2. Ours follows it, with :mod:`fire_bench.defenses.corruptions` for the
package (ImageNet-C's parameters by default, each corrupted image on uint8 levels; how sizes are
scaled and where it differs are in that module's docstring), except for the reference's bug: it
corrupts its image list in place, so each severity is applied on top of the previous one and each
type starts from the previous type's severity 5. Ours corrupts the input itself at every severity,
as the paper describes.

Threshold: the paper leaves it to the defender; ours is calibrated on the clean reference at a
false-positive rate ``fpr`` (1% by default, STRIP's FRR) with
:func:`~fire_bench.defenses.base.calibrate_threshold`. The deviations are discrete (a handful of
values), so many clean and poisoned inputs tie at the calibrated quantile, and a strict ``score >
quantile`` rule could then reject nothing at a high AUROC; the calibrated :class:`Threshold` rejects
the scores above its value and, at random (seeded), the share ``tie`` of those equal to it, so the
reference's rejection rate is ``fpr`` whatever the ties. Scores are the exact deviations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Threshold, Trigger, calibrate_threshold, register_defense
from fire_bench.defenses.corruptions import (
    CORRUPTIONS,
    MIN_SIZE,
    PARAMETERS,
    SEVERITIES,
    ParameterSet,
    corrupt,
    corruption_names,
)
from fire_defense import FireDefenseError

__all__ = ["CORRUPTIONS", "SEVERITIES", "TeCo", "corrupt", "deviation"]


def deviation(flips: torch.Tensor) -> torch.Tensor:
    """TeCo's score from flip severities ``(N, types)``: their population standard deviation per input."""
    return flips.double().std(1, correction=0).float()


@register_defense
class TeCo(RuntimeDefense):
    """TeCo: deviation across corruption types of the severity that first changes the prediction.

    Args:
        corruptions: The corruption types (names of ``parameters``' set), at least two, each once;
            ``None``: all of them (15 for ``"imagenet-c"``, 14 for ``"cifar10-c"``).
        parameters: The corruptions' severity parameters: ``"imagenet-c"`` (the authors' code, via
            ``imagecorruptions``) or ``"cifar10-c"`` (Hendrycks' 32 x 32 generator).
        reference_size: The image side at which ImageNet-C's pixel-valued parameters apply unscaled
            (32: the package on 32-pixel images; :mod:`fire_bench.defenses.corruptions`).
        fpr: Clean false-positive rate at which the threshold is calibrated.
    """

    name = "teco"
    rejects = True
    source = (
        "Liu et al., Detecting Backdoors During the Inference Stage Based on Corruption Robustness "
        "Consistency, CVPR 2023"
    )

    def __init__(
        self,
        *,
        corruptions: Sequence[str] | None = None,
        parameters: ParameterSet = "imagenet-c",
        reference_size: int = 32,
        fpr: float = 0.01,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.corruptions = corruptions
        self.parameters = parameters
        self.reference_size = reference_size
        self.fpr = fpr

    @property
    def types(self) -> tuple[str, ...]:
        """The corruption types used, in order."""
        return corruption_names(self.parameters) if self.corruptions is None else tuple(self.corruptions)

    @property
    def forward_passes(self) -> float:
        return float(1 + SEVERITIES * len(self.types))

    def flip_severities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's labels for ``x`` and, per corruption type, the first severity that changes them (6: none).

        Every severity corrupts ``x`` itself (not the previous severity's output, as the reference's bug does).
        """
        labels = self._logits(x).argmax(1)
        never = SEVERITIES + 1
        flips = torch.full((len(x), len(self.types)), never, dtype=torch.long, device=x.device)
        for column, name in enumerate(self.types):
            for severity in range(1, SEVERITIES + 1):
                corrupted = corrupt(
                    x, name, severity, self.generator_, parameters=self.parameters, reference_size=self.reference_size
                )
                changed = self._logits(corrupted).argmax(1) != labels
                flips[:, column] = torch.where(changed & (flips[:, column] == never), severity, flips[:, column])
        return labels, flips

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels, flips = self.flip_severities(x)
        return labels, deviation(flips)

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if self.parameters not in PARAMETERS:
            raise FireDefenseError(f"teco: unknown parameters {self.parameters!r}; use one of {', '.join(PARAMETERS)}.")
        names = corruption_names(self.parameters)
        unknown = sorted(set(self.types) - set(names))
        repeated = len(set(self.types)) != len(self.types)
        if unknown or repeated or len(self.types) < 2 or not 0 < self.fpr < 1 or self.reference_size < 1:
            raise FireDefenseError(
                f"teco: corruptions must be two or more distinct of {', '.join(names)} "
                f"(unknown: {', '.join(unknown) or 'none'}), fpr in (0, 1) and reference_size >= 1."
            )
        self._check_images(clean, min_size=MIN_SIZE)
        with torch.inference_mode():
            scores = torch.cat([self._scores(batch)[1] for batch in clean.split(self.batch_size)])
        self.threshold_: Threshold = calibrate_threshold(scores, self.fpr)

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x, min_size=MIN_SIZE)
        labels, scores = self._scores(x)
        return self._reject_above(labels, scores, self.threshold_)

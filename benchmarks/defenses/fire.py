"""FIRE (``fire_defense.FIRE``) behind the runtime-defense interface.

Ahlers et al., "Kill it with FIRE" (arXiv 2602.10780, 2026); the method and our design choices
are in ``docs/fire.md``. Unpaired (default): directions from the ``k`` poisoned inputs the
defender saw; paired: from the trigger applied to the clean reference. The defaults are FIRE
v2's: ``match`` repair of the inputs sent to the inferred target (a second pass for those only),
at the layer and gate quantile chosen on held-out defender data. The score is the largest margin
of a layer's projection over its gate threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal, get_args

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_defense import FIRE, FireDefenseError

__all__ = ["Condition", "FireDefense", "Mode", "Selection", "Weight", "repaired_decision"]

Mode = Literal["match", "shift", "project", "gate"]  # FIRE's repair modes (fire_defense.MODES; a test checks)
Estimate = Literal["unpaired", "paired"]
Condition = Literal["target", "none"]
Selection = Literal["holdout", "repair", "separation"]  # fire_defense.selection.SELECTIONS (a test checks)
Weight = Literal["confidence", "count"]  # fire_defense.selection.WEIGHTS (a test checks)
ESTIMATES, CONDITIONS = get_args(Estimate), get_args(Condition)


@register_defense
class FireDefense(RuntimeDefense):
    """FIRE repair at inference.

    Args:
        mode: ``'match'``, ``'shift'``, ``'project'`` or ``'gate'``.
        layers: ``'auto'`` or layer names of the classifier (``'1.layer3'``).
        estimate: ``'unpaired'`` (from the poisoned inputs) or ``'paired'`` (from the trigger).
        alpha: Step along the direction.
        fpr: Clean false-positive rate behind ``project`` caps and ``gate`` thresholds.
        condition: ``'target'`` (repair only inputs sent to an inferred target) or ``'none'`` (every input;
            FIRE's ``condition=None``, spelt as a string so a grid or command line can set it).
        select: How ``layers='auto'`` chooses: ``'holdout'``, ``'repair'`` or ``'separation'``.
        gate_quantiles: FIRE's ``gate_quantiles`` (``None`` entries: no gate).
        holdout_weight: FIRE's ``holdout_weight``: ``'confidence'`` or ``'count'``.
    """

    name = "fire"
    source = "Ahlers et al., Kill it with FIRE, arXiv 2602.10780 (2026)"
    cost_varies: ClassVar[bool] = True  # with a condition, the selected inputs run a second pass

    def __init__(
        self,
        *,
        mode: Mode = "match",
        layers: str | Sequence[str] = "auto",
        estimate: Estimate = "unpaired",
        alpha: float = 1.0,
        fpr: float = 0.01,
        condition: Condition = "target",
        select: Selection = "holdout",
        gate_quantiles: Sequence[float | None] = (None, 0.5, 0.9),
        holdout_weight: Weight = "confidence",
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.mode = mode
        self.layers = layers
        self.estimate = estimate
        self.alpha = alpha
        self.fpr = fpr
        self.condition = condition
        self.select = select
        self.gate_quantiles = gate_quantiles
        self.holdout_weight = holdout_weight

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"trigger" if self.estimate == "paired" else "poisoned"})

    @property
    def forward_passes(self) -> float:
        """1, plus (with a condition) the share of the clean reference that runs the second pass (0 before fit)."""
        return 1.0 + getattr(self, "second_pass_share_", 0.0)

    def _fire(self, layers: str | list[str], **settings: object) -> FIRE:
        if self.condition not in CONDITIONS:
            raise FireDefenseError(f"fire: unknown condition {self.condition!r}; use one of {', '.join(CONDITIONS)}.")
        condition = None if self.condition == "none" else self.condition
        options = {"mode": self.mode, "alpha": self.alpha, "fpr": self.fpr, "condition": condition}
        options |= {"select": self.select, "gate_quantiles": tuple(self.gate_quantiles), **settings}
        options["holdout_weight"] = self.holdout_weight
        return FIRE(self.model_, layers=layers, batch_size=self.batch_size, **options)

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if self.estimate not in ESTIMATES:
            raise FireDefenseError(f"fire: unknown estimate {self.estimate!r}; use one of {', '.join(ESTIMATES)}.")
        fire = self._fire(self.layers if isinstance(self.layers, str) else list(self.layers))
        self.fire_ = fire.fit(clean, poisoned=poisoned) if trigger is None else fire.fit(clean, trigger=trigger)
        self.layers_ = list(self.fire_.layers_)
        self.second_pass_share_ = second_pass_share(self.fire_, clean)
        self.setting_ = fitted_setting(self.fire_)

    def _decide(self, x: torch.Tensor) -> Decision:
        return repaired_decision(self.fire_, x)


def fitted_setting(fire: FIRE) -> str:
    """What ``fire`` chose, in words: its layers and, with a condition, its targets and gate quantile."""
    setting = ", ".join(fire.layers_)
    if fire.condition is not None:
        setting += f" targets {fire.condition_.targets} q={fire.gate_quantile_}"
    return setting


def second_pass_share(fire: FIRE, clean: torch.Tensor) -> float:
    """The share of ``clean`` that ``fire``'s condition sends to the second, repaired pass (0 without one)."""
    if fire.condition is None:
        return 0.0
    module = fire.module()
    calls: list[int] = []
    passes = [fire.model] + ([] if module.resume is None else [module.resume[1]])  # whole, resumed after the layer
    handles = [part.register_forward_pre_hook(lambda _, args: calls.append(len(args[0]))) for part in passes]
    try:
        with torch.inference_mode():
            for batch in clean.split(fire.batch_size):
                module(batch)
    finally:
        for handle in handles:
            handle.remove()
    return sum(calls) / len(clean) - 1.0


def repaired_decision(fire: FIRE, x: torch.Tensor) -> Decision:
    """Labels of ``fire``'s repaired model; the score is the largest margin of a layer's projection (from the
    first pass) over its gate threshold."""
    scores: dict[str, torch.Tensor] = {}
    labels = fire(x, scores).argmax(1)
    margins = [scores[layer] - threshold for layer, threshold in fire.thresholds_.items()]
    return Decision(labels, torch.stack(margins).amax(0))

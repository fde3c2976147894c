"""FIRE (``fire_defense.FIRE``) behind the runtime-defense interface.

Ahlers et al., "Kill it with FIRE" (arXiv 2602.10780, 2026); the method and our design choices
are in ``docs/fire.md``. Unpaired (default): directions from the ``k`` poisoned inputs the
defender saw; paired: from the trigger applied to the clean reference. One forward pass with
the repair hooks; in ``gate`` mode the projection at the first repaired layer is the score.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense
from fire_defense import FIRE, FireDefenseError

__all__ = ["FireDefense"]

ESTIMATES = ("unpaired", "paired")


@register_defense
class FireDefense(RuntimeDefense):
    """FIRE repair at inference.

    Args:
        mode: ``'shift'``, ``'project'`` or ``'gate'``.
        layers: ``'auto'`` or layer names of the classifier (``'1.layer3'``).
        estimate: ``'unpaired'`` (from the poisoned inputs) or ``'paired'`` (from the trigger).
        alpha: Step along the direction.
        fpr: Clean false-positive rate behind ``project`` caps and ``gate`` thresholds.
    """

    name = "fire"
    source = "Ahlers et al., Kill it with FIRE, arXiv 2602.10780 (2026)"

    def __init__(
        self,
        *,
        mode: str = "gate",
        layers: str | Sequence[str] = "auto",
        estimate: str = "unpaired",
        alpha: float = 1.0,
        fpr: float = 0.01,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.mode = mode
        self.layers = layers
        self.estimate = estimate
        self.alpha = alpha
        self.fpr = fpr

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"trigger" if self.estimate == "paired" else "poisoned"})

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if self.estimate not in ESTIMATES:
            raise FireDefenseError(f"fire: unknown estimate {self.estimate!r}; use one of {', '.join(ESTIMATES)}.")
        layers = self.layers if isinstance(self.layers, str) else list(self.layers)
        fire = FIRE(self.model_, layers=layers, mode=self.mode, alpha=self.alpha, fpr=self.fpr)
        self.fire_ = fire.fit(clean, poisoned=poisoned) if trigger is None else fire.fit(clean, trigger=trigger)
        self.thresholds_ = self.fire_.thresholds_

    def _decide(self, x: torch.Tensor) -> Decision:
        scores: dict[str, torch.Tensor] = {}
        with self.fire_.attached(scores):
            labels = self._logits(x).argmax(1)
        margins = [scores[layer] - threshold for layer, threshold in self.thresholds_.items()]
        return Decision(labels, torch.stack(margins).amax(0))

"""The undefended model: the reference every defense's metrics, DER and latency are compared with."""

from __future__ import annotations

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, register_defense

__all__ = ["Undefended"]


@register_defense
class Undefended(RuntimeDefense):
    """The model's own prediction, one forward pass."""

    name = "none"
    source = "no defense: the backdoored model as deployed"

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        pass

    def _decide(self, x: torch.Tensor) -> Decision:
        return Decision(self._logits(x).argmax(1), None)

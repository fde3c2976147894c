"""FIRE in streaming mode: poisoned inputs arrive one at a time, and only running statistics are kept.

The benchmark's k-curve (a grid's ``k_curve`` section) is this defense under the protocol's ``k``
set to each point of the curve. The layer is chosen (``layers='auto'``) from the first
``min(k, warmup)`` poisoned inputs, the only ones held at once; from then on FIRE's running
estimates at that layer are updated input by input (``FIRE.partial_fit``), from the first input
on; so are the inferred targets. (The clean reference's activations are gathered once, to
calibrate the thresholds.) The settings and the cost are ``fire``'s.
"""

from __future__ import annotations

import torch

from fire_bench.defenses.base import Trigger, register_defense
from fire_bench.defenses.fire import FireDefense, fitted_setting, second_pass_share
from fire_defense import FireDefenseError

__all__ = ["FireStream"]


@register_defense
class FireStream(FireDefense):
    """FIRE estimated from a stream of the ``k`` poisoned inputs (module docstring).

    Args:
        warmup: Poisoned inputs (the first ones) the layer (and gate quantile) is chosen from.
        The others: as :class:`~fire_bench.defenses.fire.FireDefense` (always unpaired).
    """

    name = "fire-stream"
    needs = frozenset({"poisoned"})
    source = "Ahlers et al., Kill it with FIRE, arXiv 2602.10780 (2026): the streaming estimate"

    def __init__(
        self,
        *,
        mode: str = "match",
        warmup: int = 10,
        alpha: float = 1.0,
        fpr: float = 0.01,
        condition: str = "target",
        select: str = "holdout",
        **common: int,
    ) -> None:
        super().__init__(mode=mode, alpha=alpha, fpr=fpr, condition=condition, select=select, **common)
        self.warmup = warmup

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 1:
            raise FireDefenseError(f"fire-stream: warmup must be an integer >= 1, got {self.warmup!r}.")
        assert poisoned is not None  # declared in needs; fit checks it
        first = self._fire("auto").fit(clean, poisoned=poisoned[: min(len(poisoned), self.warmup)])
        self.layers_ = list(first.layers_)
        gate = {"gate_quantiles": (first.gate_quantile_,)} if first.condition is not None else {}
        self.fire_ = self._fire(self.layers_, **gate).partial_fit(clean=clean)
        self.fire_.partial_fit(poisoned=[sample[None] for sample in poisoned])
        self.second_pass_share_ = second_pass_share(self.fire_, clean)
        self.setting_ = fitted_setting(self.fire_)

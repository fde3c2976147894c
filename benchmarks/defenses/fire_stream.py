"""FIRE in streaming mode: poisoned inputs arrive one at a time; running statistics and a bounded sample are kept.

The benchmark's k-curve (a grid's ``k_curve`` section) is this defense under the protocol's ``k``
set to each point of the curve. Every poisoned input updates FIRE's running statistics at every
candidate layer (``FIRE.partial_fit``, one input at a time; so are the inferred targets), and
enters a seeded uniform sample of at most ``reservoir`` inputs (reservoir sampling), the only
inputs held at once. Once the stream has been read, the layer and the gate quantile are chosen
from that sample, as a batch fit chooses them (``layers='auto'``, the ``holdout`` rule), and the
repair is built from the running statistics of the whole stream at the chosen layer. So the
choice is revisited as inputs arrive instead of being fixed by the first few, and up to
``reservoir`` inputs the stream equals the batch fit on the same inputs. (The clean reference's
activations are gathered once, to calibrate the thresholds.) The settings and the cost are ``fire``'s.
"""

from __future__ import annotations

import torch

from fire_bench.defenses.base import Trigger, register_defense
from fire_bench.defenses.fire import (
    Condition,
    FireDefense,
    Mode,
    Selection,
    Weight,
    fitted_setting,
    second_pass_share,
)
from fire_defense import FIRE, FireDefenseError
from fire_defense.layers import candidate_layers

__all__ = ["FireStream"]


def _at_layer(streamed: FIRE, layer: str, gate_quantile: float | None, fire: FIRE) -> FIRE:
    """``fire`` loaded with ``streamed``'s running statistics at ``layer`` alone, gated at ``gate_quantile``."""
    state = streamed.state_dict()
    config = {**state["config"], "layers": [layer], "gate_quantile": gate_quantile}
    return fire.load_state_dict({**state, "config": config, "layers": {layer: state["layers"][layer]}})


@register_defense
class FireStream(FireDefense):
    """FIRE estimated from a stream of the ``k`` poisoned inputs (module docstring).

    Args:
        reservoir: Poisoned inputs held at once (a seeded uniform sample of the stream), which the
            layer and gate quantile are chosen from.
        The others: as :class:`~fire_bench.defenses.fire.FireDefense` (always unpaired, ``layers='auto'``).
    """

    name = "fire-stream"
    needs = frozenset({"poisoned"})
    source = "Ahlers et al., Kill it with FIRE, arXiv 2602.10780 (2026): the streaming estimate"

    def __init__(
        self,
        *,
        mode: Mode = "match",
        reservoir: int = 100,
        alpha: float = 1.0,
        fpr: float = 0.01,
        condition: Condition = "target",
        select: Selection = "holdout",
        gate_quantiles: tuple[float | None, ...] = (None, 0.5, 0.9),
        holdout_weight: Weight = "confidence",
        **common: int,
    ) -> None:
        super().__init__(
            mode=mode,
            alpha=alpha,
            fpr=fpr,
            condition=condition,
            select=select,
            gate_quantiles=gate_quantiles,
            holdout_weight=holdout_weight,
            **common,
        )
        self.reservoir = reservoir

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if isinstance(self.reservoir, bool) or not isinstance(self.reservoir, int) or self.reservoir < 1:
            raise FireDefenseError(f"fire-stream: reservoir must be an integer >= 1, got {self.reservoir!r}.")
        assert poisoned is not None  # declared in needs; fit checks it
        streamed = self._fire(candidate_layers(self.model_), cascade=False).partial_fit(clean=clean)
        held: list[torch.Tensor] = []
        for seen, sample in enumerate(poisoned):
            streamed.partial_fit(poisoned=sample[None])
            if len(held) < self.reservoir:
                held.append(sample)
            else:  # Algorithm R: every input seen so far is held with probability reservoir / seen
                slot = int(torch.randint(seen + 1, (1,), generator=self.generator_))
                if slot < self.reservoir:
                    held[slot] = sample
        choice = self._fire("auto").fit(clean, poisoned=torch.stack(held))
        quantile = getattr(choice, "gate_quantile_", None)
        self.fire_ = _at_layer(streamed, choice.layers_[0], quantile, self._fire(list(choice.layers_)))
        self.layers_ = list(self.fire_.layers_)
        self.second_pass_share_ = second_pass_share(self.fire_, clean)
        self.setting_ = fitted_setting(self.fire_)

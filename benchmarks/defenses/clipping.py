"""Activation clipping: per-neuron upper bounds learned from clean data, applied at inference (one pass).

A backdoor tends to work through abnormally large activations of a few neurons; capping every
neuron at what clean data shows removes that headroom. MM-BD's mitigation (Wang, Xiang, Miller,
Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor Pattern
Types Using a Maximum Margin Statistic", IEEE S&P 2024) and UNIT (Cheng et al., "UNIT: Backdoor
Mitigation via Automated Neural Distribution Tightening", ECCV 2024) learn such bounds from a
small clean set. Ours is their simplest common form, with no per-neuron optimisation: the bound
of a neuron (a channel of a conv map, a unit of a vector) is one ``quantile`` of its clean
activations at each stage output of the network (``fire_defense.candidate_layers``), so a bound
never exceeds the clean maximum. MM-BD and UNIT instead optimise each bound to shrink what it
lets through while keeping clean accuracy; ``quantile='auto'`` does that with one shared knob
(UNIT's constraint): the tightest quantile that still keeps ``1 - tolerance`` of the clean
reference's predictions. At the clean maximum (``quantile=1``) a localised trigger rarely
exceeds any bound: clean images reach each channel's maximum somewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, neuron_view, per_neuron, register_defense
from fire_defense import FireDefenseError, candidate_layers, resolve_layers
from fire_defense.layers import HookHandles

__all__ = ["ActivationClipping"]


@register_defense
class ActivationClipping(RuntimeDefense):
    """Clamp each neuron at the given ``layers`` to the ``quantile`` of its clean activations.

    Args:
        layers: Layer names, or ``'stages'`` for every stage output the model has.
        quantile: 1.0 clips at the clean maximum; lower values clip tighter; ``'auto'``: the lowest of
            :attr:`QUANTILES` that changes at most ``tolerance`` of the clean reference's predictions.
        tolerance: The share of clean predictions ``'auto'`` may change.
    """

    QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)

    name = "clipping"
    source = "MM-BD (Wang et al., IEEE S&P 2024) / UNIT (Cheng et al., ECCV 2024) style clean-data bounds"

    def __init__(
        self,
        *,
        layers: str | Sequence[str] = "stages",
        quantile: float | str = "auto",
        tolerance: float = 0.02,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.layers = layers
        self.quantile = quantile
        self.tolerance = tolerance

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _hooks(self, hook_for) -> HookHandles:
        return HookHandles(self.model_, [(layer, hook_for(layer)) for layer in self.layers_])

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if not (self.quantile == "auto" or (isinstance(self.quantile, float | int) and 0 < self.quantile <= 1)):
            raise FireDefenseError(f"clipping: quantile must be in (0, 1] or 'auto', got {self.quantile!r}.")
        if not 0 <= self.tolerance < 1:
            raise FireDefenseError(f"clipping: tolerance must be in [0, 1), got {self.tolerance}.")
        self.layers_ = (
            candidate_layers(self.model_) if self.layers == "stages" else resolve_layers(self.model_, self.layers)
        )
        if not self.layers_:
            raise FireDefenseError("clipping: the model has no known stage outputs; name the layers to clip.")
        seen: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers_}

        def record(layer: str):
            return lambda module, inputs, output: seen[layer].append(per_neuron(output.detach().float()))

        with torch.inference_mode(), self._hooks(record):
            reference = torch.cat([self.model_(batch).argmax(1) for batch in clean.split(self.batch_size)])
        activations = {layer: torch.cat(seen[layer]) for layer in self.layers_}
        for quantile in self.QUANTILES if self.quantile == "auto" else (self.quantile,):
            self.quantile_ = float(quantile)
            self.bounds_ = {layer: values.quantile(self.quantile_, dim=0) for layer, values in activations.items()}
            if self.quantile != "auto" or (self.predict(clean) != reference).float().mean() <= self.tolerance:
                break

    def _decide(self, x: torch.Tensor) -> Decision:
        def clip(layer: str):
            bound = self.bounds_[layer]

            def hook(module, inputs, output: torch.Tensor) -> torch.Tensor:
                return torch.minimum(output, neuron_view(bound, output))

            return hook

        with self._hooks(clip):
            return Decision(self._logits(x).argmax(1), None)

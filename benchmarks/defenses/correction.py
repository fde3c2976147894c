"""Correcting the distribution of activations that a trigger alters (one pass).

Li, Xiang, Miller, Kesidis, "Backdoor Mitigation by Correcting the Distribution of Neural
Activations" (arXiv 2308.09850, 2023): a trigger changes the distribution of a layer's
activations; mapping triggered activations back onto the clean distribution makes the model
predict the source class again, with no parameter changed. The paper learns the correction from
a reverse-engineered trigger; given the true trigger (``needs = {"trigger"}``), this is its upper
bound. Ours is the closed form of a per-neuron affine correction: each neuron (channel) at the
chosen layer is standardised with the statistics of the triggered clean reference and rescaled to
those of the clean reference, ``h' = mu_c + (h - mu_t) * sigma_c / sigma_t``, applied to every
input (the paper optimises the transformation instead; a neuron the trigger leaves alone gets
the identity up to sampling noise).
"""

from __future__ import annotations

import torch

from fire_bench.defenses.base import Decision, RuntimeDefense, Trigger, neuron_view, per_neuron, register_defense
from fire_defense.layers import HookHandles

__all__ = ["DistributionCorrection"]


@register_defense
class DistributionCorrection(RuntimeDefense):
    """Per-neuron affine correction of one layer's activations, from the trigger applied to clean data.

    Args:
        layer: The layer to correct, or ``'last'`` for the model's last stage output.
    """

    name = "correction"
    needs = frozenset({"trigger"})
    source = "Li, Xiang, Miller, Kesidis, arXiv 2308.09850 (2023)"

    def __init__(self, *, layer: str = "last", **common: int) -> None:
        super().__init__(**common)
        self.layer = layer

    @property
    def forward_passes(self) -> float:
        return 1.0

    def _statistics(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = (self.layer_, lambda module, args, output: seen.append(per_neuron(output.detach().float())))
        with torch.inference_mode(), HookHandles(self.model_, [hook]):
            for batch in inputs.split(self.batch_size):
                self.model_(batch)
        activations = torch.cat(seen)
        return activations.mean(0), activations.std(0).clamp_min(1e-6)

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        self.layer_ = self._layer(self.layer)
        assert trigger is not None
        clean_mean, clean_std = self._statistics(clean)
        triggered_mean, triggered_std = self._statistics(trigger(clean))
        self.scale_ = clean_std / triggered_std
        self.offset_ = clean_mean - triggered_mean * self.scale_

    def _decide(self, x: torch.Tensor) -> Decision:
        def correct(module, inputs, output: torch.Tensor) -> torch.Tensor:
            return output * neuron_view(self.scale_, output) + neuron_view(self.offset_, output)

        with HookHandles(self.model_, [(self.layer_, correct)]):
            return Decision(self._logits(x).argmax(1), None)

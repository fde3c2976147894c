"""FIRE-aware: a static trigger trained with a latent regularizer that hides it from FIRE's estimate.

An adaptive attack with training control, after the latent-separability adaptive attacks: Doan,
Lao, Li, "Backdoor Attack with Imperceptible Input and Latent Modification" (WB, NeurIPS 2021),
which adds to the victim's loss a term that keeps the latent representations of poisoned and
clean inputs indistinguishable (a sliced Wasserstein distance at the penultimate layer), and
the feature-compactness attacks of Qi et al., "Revisiting the Assumption of Latent Separability
for Backdoor Defenses" (ICLR 2023), which suppress the same separability through the data alone.
We follow WB's mechanism (a latent term in the victim's loss, weighted by ``weight``) with two
changes aimed at FIRE: the term is computed at every stage FIRE's automatic layer choice
considers (:func:`fire_defense.layers.candidate_layers`: ``layer1`` .. ``layer4`` of a
PreAct-ResNet), not only the penultimate layer; and it is the distance between the means of the
poisoned and the clean activations of the same batch, not a Wasserstein or MMD term, because
that difference of means at the layer's full shape *is* FIRE's estimate ``beta`` (``docs/fire.md``):
driving it to zero removes the direction FIRE repairs along, while an MMD term's kernel bandwidth
would be one more setting and its estimate on the ~13 poisoned samples of a batch is noisier.

Per stage the term is ``|mean_p - mean_c|^2 / tr(Cov_c)``: the squared distance of the means in
units of the clean activations' total variance, so it does not change when a stage's activations
are scaled, and shrinking them (which the next block's batch norm undoes for free) is no way to
lower it. (With the denominator detached, our first form, that shrinking was the way: at weight 10
the activations collapsed and the loss became NaN within two epochs.) It can still be lowered by
inflating the clean activations' spread instead of moving the poisoned mean (seen on a small test
network; ``docs/attacks.md``). The loss added is ``weight`` times its average over the stages.

The trigger is another registered static attack's (``badnet`` by default, or ``blended``), used
by composition with this attack's target, ratio and seed; with ``weight = 0`` no hook is
attached and training is that attack's. Differences from WB: the trigger is fixed, not learned
(WB trains a trigger generator jointly), and a batch without a poisoned or with fewer than two
clean samples adds nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fire_adapters.attacks.base import Attack, create_attack, register_attack
from fire_adapters.datasets import DatasetSpec
from fire_defense import FireDefenseError
from fire_defense.checks import is_finite_number
from fire_defense.layers import candidate_layers

__all__ = ["FireAware", "mean_gap"]

_TRIGGERS = ("badnet", "blended")  # static, dirty-label triggers: poisoned positions carry them before training


def mean_gap(features: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor | None:
    """``|mean_p - mean_c|^2 / tr(Cov_c)`` of one stage's activations ``(N, ...)``; ``None`` if a group is too small.

    ``poisoned`` is a bool mask ``(N,)``; the value is unchanged when ``features`` is scaled.
    """
    flat = features.flatten(1)
    if int(poisoned.sum()) < 1 or int((~poisoned).sum()) < 2:
        return None
    clean = flat[~poisoned]
    gap = flat[poisoned].mean(0) - clean.mean(0)
    spread = clean.var(0).sum().clamp_min(1e-12)
    return gap.pow(2).sum() / spread


@register_attack
class FireAware(Attack):
    """A static trigger (``trigger``) whose poisoned activations are pulled onto the clean ones at FIRE's stages."""

    name = "fire-aware"

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        weight: float = 1.0,
        trigger: str = "badnet",
        **common: Any,
    ) -> None:
        super().__init__(dataset, **common)
        self.weight, self.trigger = weight, trigger
        if not is_finite_number(weight) or weight < 0:
            raise FireDefenseError(f"fire-aware: weight must be a finite number >= 0, got {weight!r}.")
        if trigger not in _TRIGGERS:
            raise FireDefenseError(f"fire-aware: trigger must be one of {', '.join(_TRIGGERS)}, got {trigger!r}.")
        self._trigger = create_attack(trigger, self.dataset, **common)  # same target, ratio, seed, label rule

    def apply(self, images: np.ndarray) -> np.ndarray:
        return self._trigger.apply(images)

    def feature_layers(self, model: nn.Module) -> list[str]:
        """FIRE's candidate stages of ``model``; none when ``weight`` is 0 (no hooks, plain training)."""
        return candidate_layers(model) if self.weight > 0 else []

    def feature_loss(self, features: dict[str, torch.Tensor], poisoned: torch.Tensor) -> torch.Tensor | None:
        """``weight`` x the mean over the stages of :func:`mean_gap` between the batch's poisoned and clean samples."""
        gaps = [gap for gap in (mean_gap(value, poisoned) for value in features.values()) if gap is not None]
        if not gaps:
            return None
        return self.weight * torch.stack(gaps).mean()

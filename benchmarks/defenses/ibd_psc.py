"""IBD-PSC: reject inputs whose confidence survives amplifying BatchNorm parameters (1 + n passes).

Hou, Feng, Hua, Luo, Zhang, Li, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented
Scaling Consistency" (ICML 2024). Multiplying the weight and bias of a model's last ``k``
BatchNorm layers by ``omega`` inflates its features; clean predictions lose confidence, while a
trigger's prediction keeps it. Layer selection (the paper's Algorithm 1): starting from the
BatchNorm nearest the head, amplify one more layer at a time and stop at the first depth ``k``
whose error rate on benign samples exceeds ``xi``. The parameter-oriented scaling consistency
``PSC(x)`` is the mean, over the models with the last ``k, ..., k + n - 1`` layers amplified (its
Eq. 4), of the softmax confidence in the label the deployed model predicts; an input whose PSC
reaches ``T`` is rejected (``PSC(x) >= T``, as the released code). The paper's settings:
``omega = 1.5``, ``n = 5``, ``xi = 0.6``, ``T = 0.9``.

Ours: the error rate is against the clean reference's true labels (``needs = {"labels"}``, the
paper's benign samples and BackdoorBox's labelled ``valset``); ``use_labels=False`` counts
disagreement with the deployed model's own predictions instead (an unlabelled reference).
BatchNorm order is definition order (``named_modules``), reversed. If no depth crosses ``xi``,
``k`` is the number of BatchNorm layers (where Algorithm 1 stops); depths past the last layer are
dropped, so the ensemble (and the cost) can be smaller than ``n``. The released code (BackdoorBox)
amplifies one more layer per member than Eq. 4 (``k + 1, ..., k + n``) and repeats the fully
amplified model past the last layer; we follow the equation. Its bugs, not reproduced: when no
depth crosses ``xi`` its ``prob_start`` returns ``None`` and scoring fails, it never tries the
fully amplified model in that search, and its ``test`` scores only the inputs whose prediction
equals their label. The amplified models are deep copies made at fit; the deployed model is
never modified. Only ``nn.BatchNorm2d`` layers with affine parameters are amplified, as in the
paper (the released code counts every ``BatchNorm2d``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fire_bench.defenses.base import Decision, RuntimeDefense, Threshold, Trigger, register_defense
from fire_defense import FireDefenseError

__all__ = ["IbdPsc"]


def _batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's affine BatchNorm2d layers, the one nearest the head first."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine][::-1]


@register_defense
class IbdPsc(RuntimeDefense):
    """IBD-PSC: mean confidence of BatchNorm-amplified models in the original label; high PSC is rejected.

    Args:
        n: Amplified models averaged (consecutive depths from the selected ``k``).
        omega: Factor applied to the weight and bias of each amplified BatchNorm layer.
        xi: Error rate on the clean reference at which layer selection stops.
        threshold: ``T``: inputs with PSC at or above it are rejected.
        use_labels: Measure that error against the reference's true labels (``needs = {"labels"}``);
            ``False``: against the deployed model's predictions.
    """

    name = "ibd-psc"
    rejects = True
    source = "Hou et al., IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling Consistency, ICML 2024"

    def __init__(
        self,
        *,
        n: int = 5,
        omega: float = 1.5,
        xi: float = 0.6,
        threshold: float = 0.9,
        use_labels: bool = True,
        **common: int,
    ) -> None:
        super().__init__(**common)
        self.n = n
        self.omega = omega
        self.xi = xi
        self.threshold = threshold
        self.use_labels = use_labels

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"labels"}) if self.use_labels else frozenset()

    @property
    def forward_passes(self) -> float:
        return float(1 + (len(self.scaled_models_) if hasattr(self, "scaled_models_") else self.n))

    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        if self.n < 1 or self.omega <= 0 or not 0 <= self.xi < 1:
            raise FireDefenseError("ibd-psc: n must be >= 1, omega > 0 and xi in [0, 1).")
        if not _batchnorms(self.model_):
            raise FireDefenseError(
                "ibd-psc: the model has no BatchNorm2d layer with affine parameters to amplify; "
                "IBD-PSC cannot run on it."
            )
        self._check_images(clean)
        scaled = copy.deepcopy(self.model_)
        layers = _batchnorms(scaled)
        members: list[nn.Module] = []
        self.start_depth_ = None
        with torch.no_grad():  # not inference_mode: the copies' parameters must stay ordinary tensors
            reference = self.clean_labels_ if self.clean_labels_ is not None else self._logits(clean).argmax(1)
            for depth, layer in enumerate(layers, start=1):
                layer.weight.mul_(self.omega)
                layer.bias.mul_(self.omega)
                if (
                    self.start_depth_ is None
                    and (self._logits(clean, scaled).argmax(1) != reference).float().mean() > self.xi
                ):
                    self.start_depth_ = depth
                if self.start_depth_ is not None:
                    members.append(copy.deepcopy(scaled))
                if len(members) == self.n:
                    break
        if self.start_depth_ is None:  # no depth crossed xi: Algorithm 1 ends at the last layer
            self.start_depth_, members = len(layers), [scaled]
        self.scaled_models_ = members
        self.threshold_ = Threshold(float(self.threshold))  # PSC >= T
        self.setting_ = f"k={self.start_depth_}, {len(members)} amplified models"

    def psc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed model's labels for ``x`` and their PSC: mean amplified-model confidence in them."""
        labels = self._logits(x).argmax(1)
        rows = torch.arange(len(x), device=x.device)
        confidence = sum(self._logits(x, model).float().softmax(1)[rows, labels] for model in self.scaled_models_)
        return labels, confidence / len(self.scaled_models_)

    def _decide(self, x: torch.Tensor) -> Decision:
        self._check_images(x)
        labels, psc = self.psc(x)
        return self._reject_above(labels, psc, self.threshold_)

"""Per-layer repairs as modules: what FIRE does to a layer's output, with its constants as buffers.

A repair maps a layer's output ``h`` to the repaired ``h``. It is an ``nn.Module`` whose
constants (``alpha * beta``, the unit directions, the clean centre, caps and threshold) are
buffers, so ``.to()``, ``state_dict()`` and ``torch.compile`` work as on any module (as pyvene's
interventions are). A repair is built from :class:`~fire_defense.statistics.LayerStatistics` and
refreshed in place when they change (streaming), so hooks and wrappers that hold it follow.

With ``s = <h - mean_clean, beta / |beta|>`` the projection score:

- :class:`ShiftRepair` (``shift``): ``h - alpha * beta`` for every input;
- :class:`ProjectRepair` (``project``): remove the part of ``s`` (of each of ``r`` directions)
  above the clean ``1 - fpr`` quantile;
- :class:`GateRepair` (``gate``): the shift, only for inputs whose ``s`` exceeds the clean
  ``1 - fpr / L`` quantile (``L`` repaired layers);
- :class:`MatchRepair` (``match``, FIRE v2): move the poisoned activations' distribution onto the
  clean one, per channel: ``mean_clean + (h - mean_poisoned) * std_clean / std_poisoned`` (means
  at the layer's shape, standard deviations per channel over samples and positions), so a
  trigger whose effect grows or shrinks with the input (a blend) is undone in proportion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fire_defense.errors import FireDefenseError
from fire_defense.layers import HookFn, tensor_output
from fire_defense.statistics import LayerStatistics

__all__ = [
    "REPAIRS",
    "GateRepair",
    "LayerRepair",
    "MatchRepair",
    "ProjectRepair",
    "ShiftRepair",
    "TargetCondition",
    "apply_repair",
    "build_repair",
    "projection_scores",
    "repair_hook",
]


class LayerRepair(nn.Module):
    """Base class: buffers shared by every mode, filled from a layer's statistics by :meth:`refresh`.

    Args:
        shape: The layer's output shape without the batch dimension.
        rank: Unit directions held (``> 1`` only for ``project`` with paired data).
        dtype: The dtype of the layer's output.
        device: Where the layer runs.
    """

    mode: ClassVar[str] = ""

    def __init__(self, shape: torch.Size, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        size = shape.numel()
        with torch.inference_mode(False):  # ordinary tensors: a repaired pass can be differentiated
            options = {"dtype": dtype, "device": device}
            self.register_buffer("offset", torch.zeros(shape, **options))  # alpha * beta at the layer's shape
            self.register_buffer("basis_t", torch.zeros(size, rank, **options))  # unit directions as columns
            self.register_buffer("center", torch.zeros(rank, **options))  # projections of the clean mean
            self.register_buffer("cap", torch.zeros(rank, **options))  # clean 1 - fpr quantiles (project)
            self.register_buffer("threshold", torch.zeros((), **options))  # clean quantile of s (gate, detection)
            # with a condition: the least s of an input the condition selects for it to be repaired (-inf: any)
            self.register_buffer("select_threshold", torch.full((), float("-inf"), **options))

    @torch.no_grad()
    def refresh(
        self,
        stats: LayerStatistics,
        alpha: float,
        fpr: float,
        layers: int,
        clean_projections: torch.Tensor | None = None,
    ) -> LayerRepair:
        """Recompute the buffers from ``stats`` in place (their device and dtype stay); returns ``self``.

        ``clean_projections``, if known: ``stats.clean_activations() @ stats.unit_basis().T.float()``,
        ``(N, r)`` (the layer choice computes them for many repairs in one product).
        """
        basis = stats.unit_basis()
        if basis.shape[0] != self.basis_t.shape[1]:
            raise FireDefenseError(f"the statistics hold {basis.shape[0]} directions, the repair {self.cap.numel()}.")
        center = basis @ stats.mean("clean")
        if clean_projections is None:
            clean_projections = stats.clean_activations() @ basis.T.float()
        projections = clean_projections.double() - center  # (N, r)
        values = {
            "offset": (alpha * stats.direction).view(stats.shape),
            "basis_t": basis.T,
            "center": center,
            "cap": torch.quantile(projections, 1 - fpr, dim=0),
            "threshold": torch.quantile(projections[:, 0], 1 - fpr / layers),
            **self._mode_buffers(stats, alpha),
        }
        with torch.inference_mode(False):
            for name, value in values.items():
                getattr(self, name).copy_(value)
        return self

    def _mode_buffers(self, stats: LayerStatistics, alpha: float) -> dict[str, torch.Tensor]:
        """The values of the buffers a mode adds, by name (:meth:`refresh` copies them in); none here."""
        return {}

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """``(N,)``: the projection score ``s`` on the first unit direction."""
        return torch.mv(output.flatten(1), self.basis_t[:, 0].to(output)) - self.center[0].to(output)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.offset.shape)}, rank={self.cap.numel()}"


class ShiftRepair(LayerRepair):
    """``h - alpha * beta`` for every input."""

    mode = "shift"

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return output - self.offset.to(output)


class ProjectRepair(LayerRepair):
    """``h - max(0, s - cap) * beta_hat`` along each unit direction."""

    mode = "project"

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        basis_t = self.basis_t.to(output)
        excess = torch.addmm(-self.center.to(output), output.flatten(1), basis_t).sub_(self.cap.to(output))
        return output - (excess.clamp_min_(0) @ basis_t.T).view_as(output)


class GateRepair(LayerRepair):
    """The shift for inputs whose projection score exceeds the clean threshold; the others unchanged."""

    mode = "gate"

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        flagged = (self.score(output) > self.threshold.to(output)).to(output.dtype)
        return torch.addcmul(output, flagged.view(-1, *([1] * (output.ndim - 1))), self.offset.to(output), value=-1)


class TargetCondition(nn.Module):
    """Which inputs a conditional repair applies to: those the unrepaired model sends to an inferred target.

    The targets are the classes that at least ``share`` of the poisoned inputs seen so far are
    predicted as (the attacker's label, as the defender can infer it; several for a multi-target
    attack). If none reaches ``share`` (an all-to-all attack, or no backdoor), :attr:`mask`
    holds every class: every input is repaired.

    Args:
        classes: Outputs of the classifier.
        share: Least share of the seen poisoned inputs a class needs to count as a target.
    """

    def __init__(self, classes: int, share: float, device: torch.device) -> None:
        super().__init__()
        self.share = share
        with torch.inference_mode(False):
            self.register_buffer("counts", torch.zeros(classes, dtype=torch.long, device=device))
            self.register_buffer("mask", torch.ones(classes, dtype=torch.bool, device=device))

    @torch.no_grad()
    def update(self, predictions: torch.Tensor) -> TargetCondition:
        """Count the unrepaired predictions of more poisoned inputs and recompute the targets; returns ``self``."""
        with torch.inference_mode(False):
            self.counts += torch.bincount(predictions.to(self.counts.device), minlength=len(self.counts))
            targets = self.counts >= self.share * self.counts.sum().clamp_min(1)
            self.mask.copy_(targets if targets.any() else torch.ones_like(targets))
        return self

    @property
    def targets(self) -> list[int]:
        """The inferred target classes (every class when none was found)."""
        return self.mask.nonzero().flatten().tolist()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the inputs whose unrepaired prediction is a target."""
        return self.mask[logits.argmax(1)]

    def extra_repr(self) -> str:
        return f"targets={self.targets}, share={self.share}"


class MatchRepair(LayerRepair):
    """``h + alpha * (mean_clean + (h - mean_poisoned) * scale - h)``, ``scale = std_clean / std_poisoned`` per channel.

    The scale is capped at :attr:`MAX_SCALE` (a guard for a channel that the few poisoned inputs
    seen hardly vary in; not tuned).
    """

    mode = "match"
    MAX_SCALE = 4.0

    def __init__(self, shape: torch.Size, rank: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, rank, dtype, device)
        channels = shape[0] if len(shape) == 3 else shape[-1]
        with torch.inference_mode(False):
            self.register_buffer("clean_mean", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer("poisoned_mean", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer("scale", torch.ones(channels, dtype=dtype, device=device))
            self.register_buffer("alpha", torch.ones((), dtype=dtype, device=device))
        self._channel_shape = (-1, 1, 1) if len(shape) == 3 else (-1,)

    def _mode_buffers(self, stats: LayerStatistics, alpha: float) -> dict[str, torch.Tensor]:
        ratio = stats.channel_std("clean") / stats.channel_std("poisoned").clamp_min(1e-12)
        return {
            "clean_mean": stats.mean("clean").view(stats.shape),
            "poisoned_mean": stats.mean("poisoned").view(stats.shape),
            "scale": ratio.clamp_max(self.MAX_SCALE),
            "alpha": torch.tensor(alpha),
        }

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(output).view(self._channel_shape)
        matched = torch.addcmul(self.clean_mean.to(output), output - self.poisoned_mean.to(output), scale)
        return torch.lerp(output, matched, self.alpha.to(output))


REPAIRS: dict[str, type[LayerRepair]] = {cls.mode: cls for cls in (ShiftRepair, ProjectRepair, GateRepair, MatchRepair)}
"""The repair module of each mode."""


def build_repair(
    mode: str,
    stats: LayerStatistics,
    alpha: float,
    fpr: float,
    layers: int,
    clean_projections: torch.Tensor | None = None,
) -> LayerRepair:
    """A repair of ``mode`` filled from ``stats``, on their device, in the layer's dtype.

    Args:
        mode: A key of :data:`REPAIRS`.
        stats: The layer's fitted statistics.
        alpha: Step along ``beta``.
        fpr: Clean false-positive rate behind the caps and thresholds.
        layers: How many layers are repaired together (the gate's quantile is ``1 - fpr / layers``).
        clean_projections: As :meth:`LayerRepair.refresh` takes them, if known.
    """
    direction = stats.direction
    repair = REPAIRS[mode](stats.shape, stats.unit_basis().shape[0], stats.dtype, direction.device)
    return repair.refresh(stats, alpha, fpr, layers, clean_projections)


def projection_scores(
    repairs: Sequence[LayerRepair], output: torch.Tensor | None = None, products: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, R)``: column ``j`` is ``repairs[j].score(output)`` up to rounding, all in one matrix product.

    For scoring many repairs of one layer at once (the layer choice's leave-one-out repairs).
    ``products``, if known instead of ``output``: ``output.flatten(1)`` times the repairs' first
    unit directions, ``(N, R)``.
    """
    center = torch.stack([repair.center[0] for repair in repairs])
    if products is not None:
        return products - center.to(products)
    if output is None:
        raise FireDefenseError("projection_scores needs the output or its products with the directions.")
    basis = torch.stack([repair.basis_t[:, 0] for repair in repairs], 1).to(output)
    return torch.addmm(-center.to(output), output.flatten(1), basis)


def repair_hook(
    layer: str,
    repair: LayerRepair,
    scores: dict[str, torch.Tensor] | None = None,
    active: Callable[[], bool] | None = None,
    apply: bool = True,
    above: torch.Tensor | None = None,
) -> HookFn:
    """A forward hook at ``layer`` that returns ``repair(output)``.

    Args:
        scores: If given, ``scores[layer]`` is set to the projection score of each pass.
        active: If given, the hook does nothing while ``active()`` is false.
        apply: If false, the hook only scores (the output is left as it is).
        above: If given, only the rows whose projection score exceeds it are repaired.
    """

    def hook(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
        if active is not None and not active():
            return None
        return apply_repair(layer, repair, tensor_output(layer, output), scores, apply, above)

    return hook


def apply_repair(
    layer: str,
    repair: LayerRepair,
    output: torch.Tensor,
    scores: dict[str, torch.Tensor] | None = None,
    apply: bool = True,
    above: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """What :func:`repair_hook` does to ``layer``'s ``output``: the repaired output (``None`` if not ``apply``)."""
    score = repair.score(output) if scores is not None or above is not None else None
    if scores is not None:
        scores[layer] = score
    if not apply:
        return None
    if above is None:
        return repair(output)
    keep = (score <= above.to(score)).view(-1, *[1] * (output.dim() - 1))
    return torch.where(keep, output, repair(output))

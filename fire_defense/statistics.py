"""What FIRE learns at one layer: running sums of the activations, and the clean ones kept for calibration.

:class:`LayerStatistics` is the estimator's state at a layer. It knows nothing of repairs or
hooks: :mod:`fire_defense.repair` turns it into a repair module, :mod:`fire_defense.selection`
scores it as a candidate layer. Sums are float64, so streaming one input at a time equals a batch
fit up to floating point.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fire_defense.errors import FireDefenseError, NotFittedError

__all__ = ["LayerStatistics", "channel_axes"]


def channel_axes(shape: torch.Size) -> tuple[int, ...]:
    """The axes of a batch ``(N, *shape)`` a per-channel statistic pools over: samples and positions.

    A conv map ``(C, H, W)`` has channels ``C``; tokens ``(T, D)`` have channels ``D``; a flat
    ``(D,)`` layer has one channel per unit.
    """
    if len(shape) == 3:
        return (0, 2, 3)
    return tuple(range(len(shape)))  # (T, D) -> (0, 1); (D,) -> (0,)


class LayerStatistics:
    """Running sums per stream (``clean``, ``clean_views``, ``poisoned``) at one layer.

    Args:
        shape: The layer's output shape without the batch dimension.
        dtype: The dtype of the layer's output (the repair is built in it).
        keep_poisoned: Also keep every poisoned activation (to choose a layer or decompose).
    """

    def __init__(self, shape: torch.Size, dtype: torch.dtype, keep_poisoned: bool = False) -> None:
        self.shape = shape
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.channel_sums: dict[str, torch.Tensor] = {}  # per channel, over samples and positions
        self.channel_squares: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calibration: list[torch.Tensor] = []
        self.poisoned: list[torch.Tensor] | None = [] if keep_poisoned else None
        self.basis: torch.Tensor | None = None  # (r, d) principal directions, set by a rank > 1 fit

    def add(self, stream: str, activations: torch.Tensor) -> None:
        """Add a batch ``(N, *shape)`` of ``stream``'s activations."""
        flat = activations.flatten(1)
        position_sums = flat.sum(0, dtype=torch.float64)
        axes = channel_axes(self.shape)
        # accumulated in float64 without a float64 copy of the batch (which cost more than the sums)
        squares = torch.linalg.vector_norm(activations, dim=axes, dtype=torch.float64).square()
        positions = tuple(axis - 1 for axis in axes[1:])  # the per-position sums pooled over the same axes
        channel_sums = position_sums.view(self.shape).sum(positions) if positions else position_sums
        totals = {"sums": position_sums, "channel_sums": channel_sums, "channel_squares": squares}
        for name, total in totals.items():
            sums = getattr(self, name)
            sums[stream] = sums[stream] + total if stream in sums else total
        self.counts[stream] = self.counts.get(stream, 0) + len(flat)
        if stream == "clean":
            self.calibration.append(flat.float())
        elif stream == "poisoned" and self.poisoned is not None:
            self.poisoned.append(flat.float())

    def mean(self, stream: str) -> torch.Tensor:
        """Flat float64 mean activation of ``stream``."""
        if not self.counts.get(stream):
            raise NotFittedError(f"no {stream} samples seen yet at this layer; fit or partial_fit with some first.")
        return self.sums[stream] / self.counts[stream]

    def channel_std(self, stream: str) -> torch.Tensor:
        """Per-channel float64 standard deviation of ``stream``, over samples and positions."""
        self.mean(stream)  # raises if nothing was seen
        per_channel = self.counts[stream] * self.shape.numel() / self.channel_sums[stream].numel()
        mean = self.channel_sums[stream] / per_channel
        return (self.channel_squares[stream] / per_channel - mean.square()).clamp_min(0).sqrt()

    @property
    def direction(self) -> torch.Tensor:
        """Flat ``beta``: mean poisoned minus mean clean activation (of augmented views, if any)."""
        clean = "clean_views" if "clean_views" in self.counts else "clean"
        return self.mean("poisoned") - self.mean(clean)

    def clean_activations(self) -> torch.Tensor:
        """``(N, d)`` float32: the clean reference's activations, kept to calibrate thresholds."""
        if len(self.calibration) > 1:  # joined once, not at every call
            self.calibration = [torch.cat(self.calibration)]
        return self.calibration[0]

    def poisoned_activations(self) -> torch.Tensor:
        """``(k, d)`` float32: the poisoned activations (only with ``keep_poisoned``)."""
        if not self.poisoned:
            raise NotFittedError("poisoned activations were not kept at this layer (keep_poisoned=False).")
        return torch.cat(self.poisoned)

    def unit_basis(self) -> torch.Tensor:
        """Orthonormal rows ``(r, d)``, float64: the principal directions (rank > 1), else ``beta`` normalised."""
        if self.basis is not None:
            return self.basis
        beta = self.direction
        return (beta / beta.norm().clamp_min(1e-12))[None]

    def decompose(self, rank: int) -> None:
        """Set :attr:`basis` to the top ``rank`` principal directions of the paired differences (poisoned - clean)."""
        differences = (self.poisoned_activations() - self.clean_activations()).double()
        basis = torch.linalg.svd(differences, full_matrices=False).Vh[:rank]
        signs = torch.sign(basis @ differences.mean(0)).clamp_min(0) * 2 - 1
        self.basis = basis * signs[:, None]  # oriented along the mean difference

    def separation(self) -> float:
        """d' of the projections of clean and poisoned activations on ``beta``."""
        basis = self.unit_basis()[0].float()
        clean = self.clean_activations() @ basis
        poisoned = self.poisoned_activations() @ basis
        pooled = ((clean.var(unbiased=False) + poisoned.var(unbiased=False)) / 2).sqrt()
        return float((poisoned.mean() - clean.mean()) / pooled.clamp_min(1e-12))

    def holdout(self, clean: int) -> LayerStatistics:
        """A copy estimated from the first ``clean`` clean activations and every poisoned one (kept).

        For scoring a repair on clean inputs it was not estimated from (needs ``keep_poisoned``);
        :meth:`leave_out` then takes out one poisoned input. The clean stream comes from the
        calibration store (augmented views are not used).
        """
        copy = LayerStatistics(self.shape, self.dtype, keep_poisoned=True)
        kept = self.clean_activations()
        if self.counts.get("clean") == len(kept) and clean > len(kept) - clean:  # take out the fewer held-out ones
            held = LayerStatistics(self.shape, self.dtype)
            held.add("clean", kept[clean:].view(-1, *self.shape))
            for name in ("sums", "channel_sums", "channel_squares"):
                getattr(copy, name)["clean"] = getattr(self, name)["clean"] - getattr(held, name)["clean"]
            copy.counts["clean"], copy.calibration = clean, [kept[:clean]]
        else:
            copy.add("clean", kept[:clean].view(-1, *self.shape))
        copy.add("poisoned", self.poisoned_activations().view(-1, *self.shape))
        copy.basis = self.basis
        return copy

    def leave_out(self, index: int) -> LayerStatistics:
        """A copy without the ``index``-th kept poisoned activation (the clean side is shared, not copied)."""
        removed = LayerStatistics(self.shape, self.dtype)
        removed.add("poisoned", self.poisoned_activations()[index : index + 1].view(-1, *self.shape))
        copy = LayerStatistics(self.shape, self.dtype)
        copy.calibration, copy.basis = self.calibration, self.basis
        for name in ("sums", "channel_sums", "channel_squares"):
            mine, theirs = getattr(self, name), getattr(removed, name)
            setattr(copy, name, {k: v - theirs[k] if k in theirs else v for k, v in mine.items()})
        copy.counts = {k: v - removed.counts.get(k, 0) for k, v in self.counts.items()}
        return copy

    def forget_poisoned(self) -> None:
        """Drop the per-sample poisoned store (it was only needed to choose a layer and decompose)."""
        self.poisoned = None

    def state(self) -> dict[str, Any]:
        """Tensors and plain values only (they load with ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {"shape": list(self.shape), "counts": dict(self.counts)}
        for name in ("sums", "channel_sums", "channel_squares"):
            state[name] = {k: v.cpu() for k, v in getattr(self, name).items()}
        state["calibration"] = self.clean_activations().cpu() if self.calibration else torch.empty(0)
        if self.basis is not None:
            state["basis"] = self.basis.cpu()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> LayerStatistics:
        """The statistics :meth:`state` returned, on ``device``.

        Raises:
            FireDefenseError: a value is not a finite tensor of the layer's size, or a count not a whole number.
        """
        stats = cls(torch.Size(state["shape"]), dtype)
        size = stats.shape.numel()
        counts = dict(state["counts"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
            raise FireDefenseError(f"a FIRE state's counts must be whole numbers, got {counts}; save it again.")
        stats.counts = counts
        for name in ("sums", "channel_sums", "channel_squares"):
            setattr(stats, name, {k: _finite(v, name).to(device, torch.float64) for k, v in state[name].items()})
        if any(v.shape != (size,) for v in stats.sums.values()):
            raise FireDefenseError(
                f"a FIRE state's sums do not match its layer shape {list(stats.shape)}; save it again."
            )
        calibration = _finite(state["calibration"], "calibration")
        if len(calibration):
            if calibration.ndim != 2 or calibration.shape[1] != size:
                raise FireDefenseError(
                    f"a FIRE state's calibration is {tuple(calibration.shape)}, not (N, {size}); save it again."
                )
            stats.calibration = [calibration.to(device)]
        if "basis" in state:
            basis = _finite(state["basis"], "basis")
            if basis.ndim != 2 or basis.shape[1] != size:
                raise FireDefenseError(f"a FIRE state's basis is {tuple(basis.shape)}, not (r, {size}); save it again.")
            stats.basis = basis.to(device, torch.float64)
        return stats


def _finite(value: Any, name: str) -> torch.Tensor:
    """``value`` if it is a tensor of finite numbers (a saved statistic), else a one-line error."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise FireDefenseError(
            f"a FIRE state's {name} holds a {type(value).__name__}, not a float tensor; save it again."
        )
    if not bool(torch.isfinite(value).all()):
        raise FireDefenseError(f"a FIRE state's {name} holds NaN or infinite values; fit again and save a new one.")
    return value

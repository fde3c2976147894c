"""FIRE: Feature-space Inference-time REpair of a backdoored classifier.

Ahlers, Passon, Noller, Grunske, "Kill it with FIRE: On Leveraging Latent Space Directions for
Runtime Backdoor Mitigation in Deep Neural Networks" (arXiv 2602.10780, 2026). A trigger moves
a sample's activations at a layer along a direction ``beta``; FIRE estimates ``beta`` and moves
the activations back during the forward pass, leaving the weights untouched.

The paper's text was not available to us; these choices are ours (``docs/fire.md``):

- ``beta`` is the difference of means of the layer's activations, poisoned minus clean, kept at
  the layer's own shape (``C x H x W``, ``tokens x D``). It is estimated from a trigger applied
  to the clean reference (*paired*), from ``k`` poisoned inputs (*unpaired*, optionally with
  augmented views), or from running sums updated one input or batch at a time (*streaming*:
  :meth:`FIRE.partial_fit`, equal to unpaired on the same data up to floating point).
- Layers are repaired in order and, with ``cascade=True``, a later layer's statistics are taken
  from activations already repaired at the earlier ones.
- Repair modes: ``shift`` (``h - alpha * beta`` for every input), ``project`` (remove the part of
  the projection of ``h - mean_clean`` on each unit direction that exceeds the clean
  ``1 - fpr`` quantile; ``rank > 1`` uses the top principal directions of paired differences),
  and ``gate`` (shift only inputs whose projection exceeds the clean ``1 - fpr / L`` quantile at
  that layer; the projection is returned as a detection score at no extra forward pass).
- ``layers='auto'`` picks among the stage outputs, on the defender's own data: the layer whose
  repair moves the ``k`` poisoned inputs off their (majority) prediction most while changing the
  clean reference's predictions least; near-ties (within 0.05) go to the layer where clean and
  poisoned projection scores separate best (d': difference of means over pooled std).
  ``select='separation'`` uses d' alone, which favours the last stage, where the trigger is most
  visible but the class evidence is already lost (see ``docs/fire.md``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fire_defense.device import module_device
from fire_defense.errors import FireDefenseError, NotFittedError, first_line
from fire_defense.layers import HookHandles, StopForward, candidate_layers, resolve_layers
from fire_defense.metrics import predict

__all__ = ["FIRE", "MODES", "RepairedModel"]

MODES = ("shift", "project", "gate")
SELECTIONS = ("repair", "separation")
_TIE = 0.05  # repair scores this close count as a tie, broken by separation
_PROBE_CLEAN = 64  # clean reference inputs used to score a candidate layer's repair
Data = torch.Tensor | Iterable[torch.Tensor] | Iterable[Sequence[torch.Tensor]]


class _LayerStats:
    """Running sums at one layer (float64), and the clean activations kept to calibrate thresholds."""

    def __init__(self, shape: torch.Size, keep_poisoned: bool) -> None:
        self.shape = shape
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.calibration: list[torch.Tensor] = []
        self.poisoned: list[torch.Tensor] | None = [] if keep_poisoned else None
        self.basis: torch.Tensor | None = None

    def add(self, stream: str, activations: torch.Tensor) -> None:
        flat = activations.flatten(1)
        if stream in self.sums:
            self.sums[stream] += flat.sum(0, dtype=torch.float64)
        else:
            self.sums[stream] = flat.sum(0, dtype=torch.float64)
        self.counts[stream] = self.counts.get(stream, 0) + len(flat)
        if stream == "clean":
            self.calibration.append(flat.float())
        elif stream == "poisoned" and self.poisoned is not None:
            self.poisoned.append(flat.float())

    def mean(self, stream: str) -> torch.Tensor:
        if not self.counts.get(stream):
            raise NotFittedError(f"no {stream} samples seen yet at this layer; fit or partial_fit with some first.")
        return self.sums[stream] / self.counts[stream]

    @property
    def direction(self) -> torch.Tensor:
        """Flat ``beta``: mean poisoned minus mean clean activation (of augmented views, if any)."""
        clean = "clean_views" if "clean_views" in self.counts else "clean"
        return self.mean("poisoned") - self.mean(clean)

    def clean_activations(self) -> torch.Tensor:
        return torch.cat(self.calibration)

    def unit_basis(self) -> torch.Tensor:
        """Orthonormal rows ``(r, d)``: the principal directions if fitted (rank > 1), else ``beta`` normalised."""
        if self.basis is not None:
            return self.basis
        beta = self.direction
        return (beta / beta.norm().clamp_min(1e-12))[None]

    def separation(self) -> float:
        """d' of the projections of clean and poisoned activations on ``beta``."""
        basis = self.unit_basis()[0].float()
        clean = self.clean_activations() @ basis
        poisoned = torch.cat(self.poisoned) @ basis
        pooled = ((clean.var(unbiased=False) + poisoned.var(unbiased=False)) / 2).sqrt()
        return float((poisoned.mean() - clean.mean()) / pooled.clamp_min(1e-12))

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"shape": list(self.shape), "counts": dict(self.counts)}
        state["sums"] = {k: v.cpu() for k, v in self.sums.items()}
        state["calibration"] = self.clean_activations().cpu() if self.calibration else torch.empty(0)
        if self.basis is not None:
            state["basis"] = self.basis.cpu()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> _LayerStats:
        stats = cls(torch.Size(state["shape"]), keep_poisoned=False)
        stats.counts = {k: int(v) for k, v in state["counts"].items()}
        stats.sums = {k: v.to(device, torch.float64) for k, v in state["sums"].items()}
        if len(state["calibration"]):
            stats.calibration = [state["calibration"].to(device)]
        if "basis" in state:
            stats.basis = state["basis"].to(device)
        return stats


@dataclass
class _Repair:
    """What the hook at one layer needs, in the dtype and device of that layer's output."""

    offset: torch.Tensor  # alpha * beta, at the layer's shape
    basis_t: torch.Tensor  # (d, r) unit directions as columns
    center: torch.Tensor  # (r,) projections of the clean mean
    cap: torch.Tensor  # (r,) clean 1 - fpr quantiles of the centred projections (project mode)
    threshold: torch.Tensor  # clean quantile of the first centred projection (gate mode), 0-d
    gate_level: torch.Tensor  # threshold + center[0]: compared with the raw projection, one op less


class FIRE:
    """Estimate backdoor directions in a classifier's latent spaces and reverse them at inference.

    Args:
        model: The (backdoored) classifier, in eval mode. Its weights are never changed.
        layers: ``'auto'``, a layer name, a module, or a sequence of them (repaired in this order).
        mode: ``'shift'``, ``'project'`` or ``'gate'`` (see the module docstring).
        alpha: Step along ``beta``: one value, or ``{layer: value}`` (missing layers get 1.0).
        fpr: Clean false-positive rate behind the ``project`` caps and the ``gate`` thresholds.
        rank: Principal directions per layer for ``project`` mode (> 1 needs paired data).
        cascade: Estimate each layer from activations repaired at the earlier layers.
        augmentation: Maps a batch to an augmented batch; with it, ``beta`` is estimated from
            ``views`` augmented copies of every poisoned and clean input.
        views: Augmented copies per input.
        batch_size: Inputs per forward pass while fitting.
        select: How ``layers='auto'`` chooses: ``'repair'`` or ``'separation'`` (module docstring).

    Example:
        >>> fire = FIRE(model, layers="layer3", mode="gate").fit(clean, poisoned=seen_poisoned)
        >>> logits = fire(x)                       # repaired forward pass
        >>> with fire.attached(): logits = model(x)  # the same, hooks attached for the block
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | nn.Module | Sequence[str | nn.Module] = "auto",
        mode: str = "shift",
        alpha: float | Mapping[str, float] = 1.0,
        fpr: float = 0.01,
        rank: int = 1,
        cascade: bool = True,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        views: int = 4,
        batch_size: int = 256,
        select: str = "repair",
    ) -> None:
        self.model = model
        self.layers = layers
        self.mode = mode
        self.alpha = alpha
        self.fpr = fpr
        self.rank = rank
        self.cascade = cascade
        self.augmentation = augmentation
        self.views = views
        self.batch_size = batch_size
        self.select = select
        self._fitting = False  # set while a fitting pass runs (not a hyperparameter)
        self._attached: list[HookHandles] = []  # handles given out by attach()

    # --- validation and small helpers ---------------------------------------------------------------------------

    def _validate(self) -> None:
        numbers = {"fpr": self.fpr, "rank": self.rank, "views": self.views, "batch_size": self.batch_size}
        wrong = [
            name for name, value in numbers.items() if not isinstance(value, (int, float)) or isinstance(value, bool)
        ]
        if wrong:
            raise FireDefenseError(f"{', '.join(wrong)} must be numbers.")
        if self.mode not in MODES:
            raise FireDefenseError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.select not in SELECTIONS:
            raise FireDefenseError(f"unknown select {self.select!r}; use one of {', '.join(SELECTIONS)}.")
        if not 0 < self.fpr < 1:
            raise FireDefenseError(f"fpr must be in (0, 1), got {self.fpr}.")
        if self.rank < 1 or (self.rank > 1 and self.mode != "project"):
            raise FireDefenseError(f"rank must be >= 1, and rank > 1 is used by mode='project' only (got {self.rank}).")
        if self.views < 1 or self.batch_size < 1:
            raise FireDefenseError("views and batch_size must be >= 1.")
        if self.rank > 1 and self.augmentation is not None:
            raise FireDefenseError("rank > 1 pairs each clean input with its twin; it cannot use augmented views.")
        self._check_eval()

    def _check_eval(self) -> None:
        if self.model.training:
            raise FireDefenseError("the model is in training mode; call model.eval() first (FIRE never trains it).")

    @property
    def _device(self) -> torch.device:
        return module_device(self.model)

    def _batches(self, data: Data, what: str) -> list[torch.Tensor]:
        """The input set as a list of batches on the model's device (inputs only, labels dropped)."""
        if isinstance(data, torch.Tensor):
            batches = list(data.split(self.batch_size))
        else:
            batches = [item[0] if isinstance(item, (tuple, list)) else item for item in data]
        if not all(isinstance(b, torch.Tensor) for b in batches):
            raise FireDefenseError(f"the {what} set must be a tensor or an iterable of tensor batches.")
        if not batches or sum(len(b) for b in batches) == 0:
            raise FireDefenseError(f"the {what} set is empty; give at least one input.")
        return [b.to(self._device) for b in batches]

    def _views(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        assert self.augmentation is not None
        return [torch.cat([self.augmentation(b) for _ in range(self.views)]) for b in batches]

    def _alpha(self, layer: str) -> float:
        if isinstance(self.alpha, Mapping):
            return float(self.alpha.get(layer, 1.0))
        return float(self.alpha)

    def _refuse_while_attached(self, action: str) -> None:
        self._attached = [handles for handles in self._attached if handles.attached]
        if self._attached:
            raise FireDefenseError(
                f"the repair hooks are attached (attach() / attached()); remove them before {action}. "
                "partial_fit() may run while they are attached."
            )

    def _require_fitted(self) -> None:
        if not hasattr(self, "stats_"):
            raise NotFittedError("this FIRE is not fitted yet; call fit(clean, poisoned=... or trigger=...) first.")

    # --- passes through the model ---------------------------------------------------------------------------

    def _capture(
        self,
        batches: list[torch.Tensor],
        layers: Sequence[str],
        sink: Callable[[str, torch.Tensor], None],
        repaired: Sequence[str] = (),
    ) -> None:
        """Run ``batches`` with repairs at ``repaired``; hand each activation at ``layers`` to ``sink``.

        The pass stops as soon as every captured layer has fired.
        """
        pending: set[str] = set()

        def capture(name: str) -> Callable:
            def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
                sink(name, _as_tensor(name, output).detach())
                pending.discard(name)
                if not pending:
                    raise StopForward

            return hook

        hooks = [(name, self._repair_hook(name, fitting=True)) for name in repaired]
        hooks += [(name, capture(name)) for name in layers]
        self._fitting = True  # hooks attached by the user (attach / attached) stand aside meanwhile
        try:
            with torch.inference_mode(), HookHandles(self.model, hooks):
                for batch in batches:
                    pending.update(layers)
                    with contextlib.suppress(StopForward):
                        self.model(batch)
                    if pending:
                        raise FireDefenseError(f"layers {sorted(pending)} did not run in the model's forward pass.")
        finally:
            self._fitting = False

    def _accumulate(self, streams: Mapping[str, list[torch.Tensor]], layers: Sequence[str]) -> None:
        """Add every stream's activations at ``layers`` to the running statistics (cascaded if asked)."""
        groups = [[layer] for layer in layers] if self.cascade else [list(layers)]
        done: list[str] = []
        for group in groups:
            for stream, batches in streams.items():
                self._capture(batches, group, lambda name, act, s=stream: self._stats(name, act).add(s, act), done)
            done += group
            self._invalidate()

    def _stats(self, layer: str, activations: torch.Tensor) -> _LayerStats:
        if layer not in self.stats_:
            self.stats_[layer] = _LayerStats(activations.shape[1:], keep_poisoned=self._keep_poisoned)
        elif activations.shape[1:] != self.stats_[layer].shape:
            raise FireDefenseError(
                f"layer {layer} gave activations of shape {tuple(activations.shape[1:])}, earlier "
                f"{tuple(self.stats_[layer].shape)}; inputs must be batches (N, ...) of one size (one input: x[None])."
            )
        return self.stats_[layer]

    # --- fitting --------------------------------------------------------------------------------------------------

    def fit(
        self,
        clean: Data,
        poisoned: Data | None = None,
        trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
        paired: bool = False,
    ) -> FIRE:
        """Estimate the directions from scratch.

        Args:
            clean: The defender's clean reference inputs (a tensor or an iterable of batches).
            poisoned: Poisoned inputs seen in operation (unpaired), or, with ``paired=True``, the
                triggered twins of ``clean`` in the same order.
            trigger: A function that adds the trigger to a batch; applied to ``clean`` (paired).
            paired: ``poisoned`` holds the twins of ``clean``.

        Returns:
            ``self``.
        """
        self._validate()
        self._refuse_while_attached("fit()")
        self.stats_: dict[str, _LayerStats] = {}
        self._invalidate()
        clean_batches = self._batches(clean, "clean")
        if trigger is not None and poisoned is not None:
            raise FireDefenseError("give poisoned inputs or a trigger, not both.")
        if trigger is not None:
            poisoned_batches, paired = [trigger(b) for b in clean_batches], True
        else:
            poisoned_batches = None if poisoned is None else self._batches(poisoned, "poisoned")
        if paired and (
            poisoned_batches is None or [len(b) for b in poisoned_batches] != [len(b) for b in clean_batches]
        ):
            raise FireDefenseError("paired data needs as many poisoned twins as clean inputs, in the same batches.")
        if self.rank > 1 and not paired:
            raise FireDefenseError("rank > 1 needs paired data (a trigger, or paired=True).")
        self.paired_ = paired
        auto = isinstance(self.layers, str) and self.layers == "auto"
        if auto and poisoned_batches is None:
            raise FireDefenseError(
                "layers='auto' needs poisoned inputs or a trigger to choose from; or name the layers."
            )
        self._keep_poisoned = auto or self.rank > 1
        layers = candidate_layers(self.model) if auto else resolve_layers(self.model, self.layers)
        self.layers_ = layers
        if isinstance(self.alpha, Mapping):
            unknown = set(self.alpha) - set(layers) if not auto else set()
            if unknown:
                raise FireDefenseError(f"alpha names layers that are not repaired: {sorted(unknown)}.")
        streams = {"clean": clean_batches}
        if self.augmentation is not None:
            streams["clean_views"] = self._views(clean_batches)
        if poisoned_batches is not None:
            streams["poisoned"] = self._views(poisoned_batches) if self.augmentation is not None else poisoned_batches
        if auto:  # one pass at every candidate, then keep the best one
            cascade, self.cascade = self.cascade, False
            try:
                self._accumulate(streams, layers)
            finally:
                self.cascade = cascade
            best = self._choose_layer(layers, clean_batches, poisoned_batches)
            self.layers_, self.stats_ = [best], {best: self.stats_[best]}
        else:
            self._accumulate(streams, layers)
        if self.rank > 1:
            for stats in self.stats_.values():
                differences = torch.cat(stats.poisoned) - stats.clean_activations()
                basis = torch.linalg.svd(differences.double(), full_matrices=False).Vh[: self.rank]
                signs = torch.sign(basis @ differences.double().mean(0)).clamp_min(0) * 2 - 1
                stats.basis = basis * signs[:, None]  # oriented along the mean difference
        for stats in self.stats_.values():
            stats.poisoned = None  # the per-sample store was only needed to choose and decompose
        self._keep_poisoned = False
        return self

    def _choose_layer(self, candidates: list[str], clean: list[torch.Tensor], poisoned: list[torch.Tensor]) -> str:
        """The candidate whose repair best moves the poisoned inputs off their prediction and leaves clean ones."""
        separation = {layer: self.stats_[layer].separation() for layer in candidates}
        if self.select == "separation":
            self.layer_scores_ = {layer: {"separation": separation[layer]} for layer in candidates}
            return max(candidates, key=separation.__getitem__)
        probe_clean, probe_poisoned = torch.cat(clean)[:_PROBE_CLEAN], torch.cat(poisoned)
        clean_before = predict(self.model, probe_clean, self.batch_size)
        poisoned_before = predict(self.model, probe_poisoned, self.batch_size)
        target = np.bincount(poisoned_before).argmax()  # the attack's label, as the defender can infer it
        every, repair = self.stats_, {}
        try:
            for layer in candidates:
                self.layers_, self.stats_ = [layer], {layer: every[layer]}
                self._invalidate()
                hooks = [(layer, self._repair_hook(layer, fitting=True))]
                self._fitting = True  # (no user hooks can be attached here: fit() refuses then)
                try:
                    with HookHandles(self.model, hooks):
                        moved = np.mean(predict(self.model, probe_poisoned, self.batch_size) != target)
                        disturbed = np.mean(predict(self.model, probe_clean, self.batch_size) != clean_before)
                finally:
                    self._fitting = False
                repair[layer] = float(moved - disturbed)
        finally:
            self.stats_ = every
            self._invalidate()
        self.layer_scores_ = {layer: {"repair": repair[layer], "separation": separation[layer]} for layer in candidates}
        near_best = [layer for layer in candidates if repair[layer] >= max(repair.values()) - _TIE]
        return max(near_best, key=separation.__getitem__)

    def partial_fit(
        self,
        clean: Data | None = None,
        poisoned: Data | None = None,
        trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> FIRE:
        """Update the running statistics with more inputs (streaming); no input is stored.

        The first call needs ``clean`` (or a prior :meth:`fit`) and named layers. ``trigger`` adds
        the triggered version of ``clean`` as poisoned inputs.
        """
        if self.rank > 1:
            raise FireDefenseError("rank > 1 needs all paired differences at once; use fit(), not partial_fit().")
        if trigger is not None and poisoned is not None:
            raise FireDefenseError("give poisoned inputs or a trigger, not both.")
        if not hasattr(self, "stats_"):
            self._validate()
            if isinstance(self.layers, str) and self.layers == "auto":
                raise FireDefenseError(
                    "streaming needs named layers (or a first fit() with poisoned data to choose one)."
                )
            if clean is None:
                raise FireDefenseError("the first partial_fit needs the clean reference set.")
            self.stats_, self.paired_, self._keep_poisoned = {}, False, False
            self._invalidate()
            self.layers_ = resolve_layers(self.model, self.layers)
        self._check_eval()
        streams: dict[str, list[torch.Tensor]] = {}
        if clean is not None:
            streams["clean"] = self._batches(clean, "clean")
            if self.augmentation is not None:
                streams["clean_views"] = self._views(streams["clean"])
        if trigger is not None:
            if clean is None:
                raise FireDefenseError("a trigger needs clean inputs to apply it to.")
            poisoned_batches = [trigger(b) for b in streams["clean"]]
        else:
            poisoned_batches = None if poisoned is None else self._batches(poisoned, "poisoned")
        if poisoned_batches is not None:
            streams["poisoned"] = self._views(poisoned_batches) if self.augmentation is not None else poisoned_batches
        if not streams:
            raise FireDefenseError("partial_fit needs clean or poisoned inputs.")
        self._accumulate(streams, self.layers_)
        return self

    # --- the repair ---------------------------------------------------------------------------------------------

    def _invalidate(self) -> None:
        """Forget the repair tensors derived from the statistics (they changed); hooks notice the new version."""
        self._cache: dict[tuple, _Repair] = {}
        self._version = getattr(self, "_version", 0) + 1

    def _repair_for(self, layer: str, dtype: torch.dtype, device: torch.device) -> _Repair:
        key = (layer, dtype, device)
        if key not in self._cache:
            self._cache[key] = self._build_repair(layer, dtype, device)
        return self._cache[key]

    @torch.inference_mode(False)
    def _build_repair(self, layer: str, dtype: torch.dtype, device: torch.device) -> _Repair:
        """Ordinary (not inference-mode) tensors, so a repaired forward pass can also be differentiated."""
        stats = self.stats_[layer]
        basis = stats.unit_basis()
        center = basis @ stats.mean("clean")
        projections = stats.clean_activations().double() @ basis.T - center  # (N, r)
        cap = torch.quantile(projections, 1 - self.fpr, dim=0)
        threshold = torch.quantile(projections[:, 0], 1 - self.fpr / len(self.layers_))
        offset = (self._alpha(layer) * stats.direction).view(stats.shape)
        tensors = (offset, basis.T, center, cap, threshold, threshold + center[0])
        return _Repair(*(t.to(device, dtype).contiguous().clone() for t in tensors))

    def _repair_hook(
        self, layer: str, scores: dict[str, torch.Tensor] | None = None, fitting: bool = False
    ) -> Callable:
        """The forward hook at ``layer``: few tensor operations, since it runs on every forward pass.

        A hook made for a fitting pass (``fitting=True``) repairs during it; the others stand aside then.
        """
        mode, cached = self.mode, [None, None]  # [repair, (dtype, device, version)]: resolved when they change

        def hook(module: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
            if self._fitting != fitting:
                return None
            if not isinstance(output, torch.Tensor):
                _as_tensor(layer, output)
            if cached[1] != (output.dtype, output.device, self._version):
                cached[:] = (
                    self._repair_for(layer, output.dtype, output.device),
                    (output.dtype, output.device, self._version),
                )
            repair: _Repair = cached[0]
            if scores is not None:
                scores[layer] = torch.mv(output.flatten(1), repair.basis_t[:, 0]) - repair.center[0]
            if mode == "shift":
                return output - repair.offset
            if mode == "gate":
                projection = torch.mv(output.flatten(1), repair.basis_t[:, 0])
                flagged = (projection > repair.gate_level).to(output.dtype).view(-1, *([1] * (output.ndim - 1)))
                return torch.addcmul(output, flagged, repair.offset, value=-1)
            excess = torch.addmm(-repair.center, output.flatten(1), repair.basis_t).sub_(repair.cap).clamp_min_(0)
            return output - (excess @ repair.basis_t.T).view_as(output)

        return hook

    @contextlib.contextmanager
    def attached(self, scores: dict[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
        """Attach the repair hooks to the model for the block (removed on exit, also after an error).

        Args:
            scores: If given, filled with each layer's projection score ``(N,)`` of the last forward pass.
        """
        with self.attach(scores):
            yield self.model

    def attach(self, scores: dict[str, torch.Tensor] | None = None) -> HookHandles:
        """Attach the repair hooks until the returned handles' ``remove()``: the hot path, with no per-call cost."""
        self._require_fitted()
        self._check_eval()
        handles = HookHandles(self.model, [(layer, self._repair_hook(layer, scores)) for layer in self.layers_])
        self._attached.append(handles)
        return handles

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The repaired forward pass."""
        with self.attached():
            return self.model(x)

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's projection score ``(N,)`` (``h - mean_clean`` on the unit direction), from a repaired pass."""
        scores: dict[str, torch.Tensor] = {}
        with self.attached(scores):
            self.model(x)
        return scores

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the gate's verdict (any layer's score above its clean threshold)."""
        scores = self.scores(x)
        thresholds = self.thresholds_
        return torch.stack([scores[layer] > thresholds[layer] for layer in self.layers_]).any(0)

    def fold(self, example: torch.Tensor, into: str | None = None) -> nn.Module:
        """A copy of the model with the ``shift`` folded into a downstream bias (:func:`fire_defense.fold.fold`)."""
        from fire_defense.fold import fold

        return fold(self, example, into)

    def module(self) -> RepairedModel:
        """The repaired model as an ``nn.Module`` (hooks attached during each forward call)."""
        self._require_fitted()
        return RepairedModel(self)

    # --- fitted state -----------------------------------------------------------------------------------------

    @property
    def directions_(self) -> dict[str, torch.Tensor]:
        """``beta`` per layer, at the layer's shape."""
        self._require_fitted()
        return {layer: s.direction.view(s.shape).float() for layer, s in self.stats_.items()}

    @property
    def thresholds_(self) -> dict[str, float]:
        """The gate threshold per layer (clean ``1 - fpr / L`` quantile of the projection score)."""
        self._require_fitted()
        return {layer: float(self._repair_for(layer, torch.float64, self._device).threshold) for layer in self.layers_}

    def state_dict(self) -> dict[str, Any]:
        """Directions and statistics as tensors and plain values; saved, it loads with ``weights_only=True``."""
        self._require_fitted()
        alpha = dict(self.alpha) if isinstance(self.alpha, Mapping) else float(self.alpha)
        return {
            "config": {
                "layers": list(self.layers_),
                "mode": self.mode,
                "alpha": alpha,
                "fpr": self.fpr,
                "rank": self.rank,
                "cascade": self.cascade,
                "paired": self.paired_,
            },
            "layers": {layer: stats.state() for layer, stats in self.stats_.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> FIRE:
        """Restore what :meth:`state_dict` returned; the model must have the same layers.

        Nothing changes unless the whole state is valid.
        """
        self._refuse_while_attached("load_state_dict()")
        try:
            config, saved = state["config"], state["layers"]
            layers = resolve_layers(self.model, config["layers"])
            settings = {key: config[key] for key in ("mode", "alpha", "fpr", "rank", "cascade")}
            stats = {layer: _LayerStats.from_state(saved[layer], self._device) for layer in layers}
            paired = bool(config["paired"])
        except FireDefenseError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise FireDefenseError(f"not a FIRE state dict ({type(error).__name__}: {first_line(error)}).") from None
        previous = {key: getattr(self, key) for key in settings}
        self.__dict__.update(settings)
        try:
            self._validate()
        except FireDefenseError:
            self.__dict__.update(previous)
            raise
        self.layers_, self.stats_, self.paired_ = layers, stats, paired
        self._keep_poisoned = False
        self._invalidate()
        return self

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path``."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | Path) -> FIRE:
        """Read a file written by :meth:`save` with ``torch.load(weights_only=True)``: it cannot run code."""
        try:
            state = torch.load(path, map_location=self._device, weights_only=True)
        except FileNotFoundError:
            raise FireDefenseError(f"{path} does not exist.") from None
        except Exception as error:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
            raise FireDefenseError(
                f"{path} is not a FIRE state file that loads safely ({first_line(error)})."
            ) from None
        return self.load_state_dict(state)


class RepairedModel(nn.Module):
    """A fitted :class:`FIRE` as a module: ``RepairedModel(fire)(x) == fire(x)``; ``.to()`` moves the model."""

    def __init__(self, fire: FIRE) -> None:
        super().__init__()
        self.model = fire.model
        self._fire = fire

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._fire.attached():
            return self.model(x)


def _as_tensor(layer: str, output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise FireDefenseError(f"layer {layer} returns a {type(output).__name__}, not a tensor; choose another layer.")
    return output

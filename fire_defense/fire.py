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
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fire_defense.checks import is_finite_number, is_integer, is_number
from fire_defense.device import module_device
from fire_defense.errors import FireDefenseError, NotFittedError, first_line, torch_load_reason
from fire_defense.layers import HookHandles, candidate_layers, capture_activations, resolve_layers, tensor_output
from fire_defense.repair import REPAIRS, LayerRepair, TargetCondition, apply_repair, build_repair, repair_hook
from fire_defense.selection import SELECTIONS, WEIGHTS, choose_layer, gate_threshold
from fire_defense.split import hooks_on_path, split_at
from fire_defense.statistics import LayerStatistics

__all__ = ["FIRE", "MODES", "RepairedModel"]

MODES = tuple(REPAIRS)
CONDITIONS = (None, "target")
Data = torch.Tensor | Iterable[torch.Tensor] | Iterable[Sequence[torch.Tensor]]
Streams = Mapping[str, list[torch.Tensor]]


class FIRE:
    """Estimate backdoor directions in a classifier's latent spaces and reverse them at inference.

    Args:
        model: The (backdoored) classifier, in eval mode. Its weights are never changed.
        layers: ``'auto'``, a layer name, a module, or a sequence of them (repaired in this order).
        mode: ``'match'`` (the default), ``'shift'``, ``'project'`` or ``'gate'`` (:mod:`fire_defense.repair`).
        alpha: Step along ``beta``: one value, or ``{layer: value}`` (missing layers get 1.0).
        fpr: Clean false-positive rate behind the ``project`` caps and the ``gate`` thresholds.
        rank: Principal directions per layer for ``project`` mode (> 1 needs paired data).
        cascade: Estimate each layer from activations repaired at the earlier layers.
        augmentation: Maps a batch to an augmented batch; with it, ``beta`` is estimated from
            ``views`` augmented copies of every poisoned and clean input.
        views: Augmented copies per input.
        batch_size: Inputs per forward pass while fitting.
        select: How ``layers='auto'`` chooses: ``'repair'``, ``'separation'`` or ``'holdout'``
            (:mod:`fire_defense.selection`).
        condition: ``None`` (repair every input) or ``'target'``: repair only the inputs the
            unrepaired model sends to a target inferred from the poisoned inputs seen
            (:class:`~fire_defense.repair.TargetCondition`); those run a second, repaired pass.
        target_share: With ``condition='target'``, the least share of the seen poisoned inputs
            a class must be predicted for to count as a target.
        gate_quantiles: With ``condition='target'``, an input the condition selects is repaired
            only if its projection score also exceeds this quantile of the scores of the clean
            reference inputs the condition selects (``None``: no such test). With
            ``layers='auto'`` and ``select='holdout'`` the best of them is chosen with the
            layer (``gate_quantile_``); otherwise the first is used.
        holdout_weight: With ``select='holdout'``, what a seen poisoned input the repair moves off the
            target counts: ``'confidence'`` (the softmax probability of its repaired prediction; the
            default) or ``'count'`` (1).

    Fitted state: ``layers_`` (the repaired layers), ``stats_`` (their
    :class:`~fire_defense.statistics.LayerStatistics`), ``repairs_`` (their repair modules, refreshed
    in place by :meth:`partial_fit`), ``paired_``, with ``layers='auto'`` ``layer_scores_``, and
    with ``condition='target'`` ``condition_`` (the inferred targets, updated by :meth:`partial_fit`),
    ``gate_quantile_`` and ``clean_predictions_`` (the unrepaired predictions of the clean reference).

    Example:
        >>> fire = FIRE(model, layers="layer3", mode="gate").fit(clean, poisoned=seen_poisoned)
        >>> logits = fire(x)                       # repaired forward pass
        >>> with fire.attached(): logits = model(x)  # the same, hooks attached for the block
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | nn.Module | Sequence[str | nn.Module] = "auto",
        mode: str = "match",
        alpha: float | Mapping[str, float] = 1.0,
        fpr: float = 0.01,
        rank: int = 1,
        cascade: bool = True,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        views: int = 4,
        batch_size: int = 256,
        select: str = "holdout",
        condition: str | None = "target",
        target_share: float = 0.5,
        gate_quantiles: Sequence[float | None] = (None, 0.5, 0.9),
        holdout_weight: str = "confidence",
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
        self.condition = condition
        self.target_share = target_share
        self.gate_quantiles = gate_quantiles
        self.holdout_weight = holdout_weight
        self._attached: list[HookHandles] = []  # handles given out by attach()
        self._splits: dict[tuple[str, ...], tuple[str, nn.Module, nn.Module] | None] = {}  # the model cut at its layers
        self._module: tuple[list[str], list[LayerRepair], TargetCondition | None, RepairedModel] | None = None
        self._own_passes = 0  # > 0 while FIRE's own fitting passes run: the attached hooks stand aside

    # --- validation and small helpers ---------------------------------------------------------------------------

    def _validate(self) -> None:
        integers = {"rank": self.rank, "views": self.views, "batch_size": self.batch_size}
        wrong = [f"{name}={value!r}" for name, value in integers.items() if not is_integer(value)]
        if wrong:
            raise FireDefenseError(f"rank, views and batch_size must be whole numbers; got {', '.join(wrong)}.")
        if not is_number(self.fpr):
            raise FireDefenseError(f"fpr must be a number in (0, 1), got {self.fpr!r}.")
        alphas = list(self.alpha.values()) if isinstance(self.alpha, Mapping) else [self.alpha]
        if not all(is_finite_number(value) for value in alphas):
            raise FireDefenseError(f"alpha must be a finite number or {{layer: finite number}}, got {self.alpha!r}.")
        if self.mode not in MODES:
            raise FireDefenseError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}.")
        if self.select not in SELECTIONS:
            raise FireDefenseError(f"unknown select {self.select!r}; use one of {', '.join(SELECTIONS)}.")
        if self.holdout_weight not in WEIGHTS:
            raise FireDefenseError(f"unknown holdout_weight {self.holdout_weight!r}; use one of {', '.join(WEIGHTS)}.")
        if self.condition not in CONDITIONS:
            raise FireDefenseError(f"unknown condition {self.condition!r}; use None or 'target'.")
        if not isinstance(self.target_share, (int, float)) or not 0 < self.target_share <= 1:
            raise FireDefenseError(f"target_share must be in (0, 1], got {self.target_share!r}.")
        quantiles = list(self.gate_quantiles) if isinstance(self.gate_quantiles, (list, tuple)) else None
        if not quantiles or not all(q is None or (isinstance(q, float) and 0 < q < 1) for q in quantiles):
            raise FireDefenseError(
                f"gate_quantiles must be a non-empty list of None or floats in (0, 1), got {quantiles}."
            )
        if self.select == "holdout" and self.augmentation is not None:
            raise FireDefenseError("select='holdout' leaves out single poisoned inputs; it cannot use augmented views.")
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
        if not all(isinstance(b, torch.Tensor) and b.ndim >= 1 for b in batches):
            raise FireDefenseError(f"the {what} set must be a tensor or an iterable of tensor batches (N, ...).")
        if not batches or sum(len(b) for b in batches) == 0:
            raise FireDefenseError(f"the {what} set is empty; give at least one input.")
        for batch in batches:
            _check_inputs(batch, what)
        return [b.to(self._device) for b in batches]

    def _input_shape(self, *sets: list[torch.Tensor] | None) -> tuple[int, ...]:
        """The shape of one input, the same in every batch of ``sets`` and as in earlier fits (``input_shape_``)."""
        shapes = {tuple(b.shape[1:]) for batches in sets for b in batches or ()}
        known = getattr(self, "input_shape_", None)
        if len(shapes) > 1 or (known is not None and shapes != {known}):
            seen = sorted(shapes | ({known} if known is not None else set()))
            raise FireDefenseError(
                f"inputs must all be batches (N, ...) of one size, got {', '.join(map(str, seen))}; "
                "one input is x[None]."
            )
        return shapes.pop()

    def _check_forward(self, x: torch.Tensor) -> None:
        """Refuse inputs a fitted FIRE cannot repair: not a float batch, NaN or infinite, or of another size."""
        if not isinstance(x, torch.Tensor):
            raise FireDefenseError(f"inputs must be a tensor batch (N, ...), got {type(x).__name__}.")
        _check_inputs(x, "")
        expected = getattr(self, "input_shape_", None)
        if expected is not None and tuple(x.shape[1:]) != expected:
            raise FireDefenseError(
                f"inputs are {tuple(x.shape)} but FIRE was fitted on batches (N, {', '.join(map(str, expected))}); "
                "give inputs of that size (one input: x[None])."
            )

    def _streams(self, clean: list[torch.Tensor] | None, poisoned: list[torch.Tensor] | None) -> dict:
        """The batches of each statistics stream: clean, their augmented views, poisoned (as views if augmenting)."""
        augment = self.augmentation

        def views(batches: list[torch.Tensor]) -> list[torch.Tensor]:
            assert augment is not None
            return [torch.cat([augment(b) for _ in range(self.views)]) for b in batches]

        streams: dict[str, list[torch.Tensor]] = {}
        if clean is not None:
            streams["clean"] = clean
            if augment is not None:
                streams["clean_views"] = views(clean)
        if poisoned is not None:
            streams["poisoned"] = views(poisoned) if augment is not None else poisoned
        return streams

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
        if hasattr(self, "stats_") and not hasattr(self, "repairs_"):
            raise NotFittedError("no poisoned samples seen yet; partial_fit(poisoned=...) with some first.")
        if not hasattr(self, "repairs_"):
            raise NotFittedError("this FIRE is not fitted yet; call fit(clean, poisoned=... or trigger=...) first.")

    # --- gathering statistics -------------------------------------------------------------------------------------

    def _gather(
        self,
        streams: Streams,
        layers: Sequence[str],
        stats: dict[str, LayerStatistics],
        repairs: dict[str, LayerRepair] | None,
        cascade: bool,
        keep_poisoned: bool = False,
        outputs: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:
        """Add every stream's activations at ``layers`` to ``stats``, and refresh (or build) ``repairs`` from them.

        With ``cascade``, layer by layer, each from activations repaired at the layers before it
        (``repairs`` is then required); ``repairs=None`` leaves repairs to the caller. ``outputs``,
        if given (one group only), gets each stream's model outputs: the passes then run to the end.
        """
        groups = [[layer] for layer in layers] if cascade else [list(layers)]
        done: list[str] = []

        def sink(stream: str) -> Callable[[str, torch.Tensor], None]:
            def add(layer: str, activations: torch.Tensor) -> None:
                if layer not in stats:
                    stats[layer] = LayerStatistics(activations.shape[1:], activations.dtype, keep_poisoned)
                elif activations.shape[1:] != stats[layer].shape:
                    raise FireDefenseError(
                        f"layer {layer} gave activations of shape {tuple(activations.shape[1:])}, earlier "
                        f"{tuple(stats[layer].shape)}; inputs must be batches (N, ...) of one size "
                        "(one input: x[None])."
                    )
                stats[layer].add(stream, activations)

            return add

        for group in groups:
            hooks = [(layer, repair_hook(layer, repairs[layer])) for layer in done] if repairs is not None else []
            with self._own_pass():  # these passes carry their own repairs
                for stream, batches in streams.items():
                    kept = None if outputs is None else outputs.setdefault(stream, [])
                    capture_activations(self.model, batches, group, sink(stream), hooks, kept)
            for layer in group if repairs is not None else ():
                if "poisoned" in stats[layer].counts and "clean" in stats[layer].counts:
                    self._refresh(layer, stats[layer], repairs, len(layers))
            done += group

    def _refresh(self, layer: str, stats: LayerStatistics, repairs: dict[str, LayerRepair], layers: int) -> None:
        """Refresh ``repairs[layer]`` in place from ``stats`` (build it if it is missing or of another rank)."""
        repair = repairs.get(layer)
        if repair is None or repair.cap.numel() != stats.unit_basis().shape[0]:
            repairs[layer] = build_repair(self.mode, stats, self._alpha(layer), self.fpr, layers)
        else:
            repair.refresh(stats, self._alpha(layer), self.fpr, layers)

    def _predictions(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """The unrepaired model's outputs on ``batches``, whatever is attached."""
        with self._own_pass(), torch.inference_mode():
            return torch.cat([self.model(batch) for batch in batches])

    @contextlib.contextmanager
    def _own_pass(self) -> Iterator[None]:
        """FIRE's own passes through the model: the hooks given out by :meth:`attach` stand aside meanwhile."""
        self._own_passes += 1
        try:
            yield
        finally:
            self._own_passes -= 1

    def _condition_outputs(self, layers: Sequence[str]) -> dict[str, list[torch.Tensor]] | None:
        """An empty ``outputs`` for :meth:`_gather` where its passes can give the condition the unrepaired model
        outputs (one group of layers, no augmented views), sparing a pass of their own; else ``None``."""
        one_group = not self.cascade or len(layers) == 1
        return {} if self.condition == "target" and one_group and self.augmentation is None else None

    def _observe(
        self,
        outputs: dict[str, list[torch.Tensor]] | None,
        clean: list[torch.Tensor] | None,
        poisoned: list[torch.Tensor] | None,
    ) -> None:
        """With the target condition: update ``condition_`` with the unrepaired outputs on ``poisoned`` and add
        the reference's predictions on ``clean`` to ``clean_predictions_`` (for the gate threshold), from the
        gathering passes' ``outputs`` where given, else from passes of their own."""
        if self.condition != "target":
            return
        if poisoned is not None:
            self._update_condition(torch.cat(outputs["poisoned"]) if outputs else self._predictions(poisoned))
        if clean is not None:
            new = (torch.cat(outputs["clean"]) if outputs else self._predictions(clean)).argmax(1)
            self.clean_predictions_ = torch.cat([getattr(self, "clean_predictions_", new[:0]), new])

    def _update_condition(self, logits: torch.Tensor) -> None:
        """Update ``condition_`` (made on first use) with the unrepaired outputs on more poisoned inputs."""
        if not hasattr(self, "condition_"):
            self.condition_ = TargetCondition(logits.shape[1], self.target_share, self._device)
        self.condition_.update(logits.argmax(1))

    def _set_gate_thresholds(self) -> None:
        """Each repair's ``select_threshold`` from the clean reference the condition selects (``gate_quantile_``)."""
        if not hasattr(self, "condition_") or not hasattr(self, "repairs_"):
            return
        selected = self.condition_.mask[self.clean_predictions_].cpu()
        for layer in self.layers_:
            repair, stats = self.repairs_[layer], self.stats_[layer]
            scores = repair.score(stats.clean_activations().view(-1, *stats.shape).to(repair.offset)).cpu()
            with torch.inference_mode(False), torch.no_grad():
                repair.select_threshold.fill_(gate_threshold(scores, selected, self.gate_quantile_))

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

        Raises:
            FireDefenseError: a setting of the wrong kind or range (NaN, a fraction where a whole number
                belongs, an unknown layer), or inputs that are uint8, hold NaN or infinite values, or differ in size.
        """
        self._validate()
        self._refuse_while_attached("fit()")
        clean_batches = self._batches(clean, "clean")
        if trigger is not None and poisoned is not None:
            raise FireDefenseError("give poisoned inputs or a trigger, not both.")
        if trigger is not None:
            poisoned_batches, paired = [trigger(b) for b in clean_batches], True
            for batch in poisoned_batches:
                _check_inputs(batch, "triggered")
        else:
            poisoned_batches = None if poisoned is None else self._batches(poisoned, "poisoned")
        self.__dict__.pop("input_shape_", None)
        input_shape = self._input_shape(clean_batches, poisoned_batches)
        if paired and (
            poisoned_batches is None or [len(b) for b in poisoned_batches] != [len(b) for b in clean_batches]
        ):
            raise FireDefenseError("paired data needs as many poisoned twins as clean inputs, in the same batches.")
        if self.rank > 1 and not paired:
            raise FireDefenseError("rank > 1 needs paired data (a trigger, or paired=True).")
        auto = isinstance(self.layers, str) and self.layers == "auto"
        if auto and poisoned_batches is None:
            raise FireDefenseError(
                "layers='auto' needs poisoned inputs or a trigger to choose from; or name the layers."
            )
        layers = candidate_layers(self.model) if auto else resolve_layers(self.model, self.layers)
        unknown = sorted(set(self.alpha) - set(layers)) if isinstance(self.alpha, Mapping) and not auto else []
        if unknown:
            raise FireDefenseError(f"alpha names layers that are not repaired: {unknown}.")
        streams = self._streams(clean_batches, poisoned_batches)
        stats: dict[str, LayerStatistics] = {}
        repairs: dict[str, LayerRepair] = {}
        layer_scores = None
        for name in ("repairs_", "condition_", "layer_scores_", "gate_quantile_", "clean_predictions_"):
            self.__dict__.pop(name, None)
        quantile = self.gate_quantiles[0]
        if auto:  # one pass through every candidate to the end (the outputs come free), then keep the best one
            outputs: dict[str, list[torch.Tensor]] = {}
            self._gather(streams, layers, stats, None, cascade=False, keep_poisoned=True, outputs=outputs)
            assert poisoned_batches is not None
            clean_logits, poisoned_logits = torch.cat(outputs["clean"]), torch.cat(outputs["poisoned"])
            self._observe(outputs, clean_batches, poisoned_batches)
            choice = choose_layer(
                self.model,
                stats,
                torch.cat(clean_batches),
                torch.cat(poisoned_batches),
                build=lambda layer, layer_stats, projections=None: build_repair(
                    self.mode, layer_stats, self._alpha(layer), self.fpr, 1, projections
                ),
                select=self.select,
                batch_size=self.batch_size,
                condition=getattr(self, "condition_", None),
                quantiles=self.gate_quantiles,
                clean_logits=clean_logits,
                poisoned_logits=poisoned_logits,
                weight=self.holdout_weight,
            )
            layers, layer_scores = [choice.layer], choice.scores
            quantile = choice.quantile if self.select == "holdout" else quantile
            stats = {choice.layer: stats[choice.layer]}
        else:
            outputs = self._condition_outputs(layers)
            self._gather(
                streams, layers, stats, repairs, cascade=self.cascade, keep_poisoned=self.rank > 1, outputs=outputs
            )
            self._observe(outputs, clean_batches, poisoned_batches)
        for layer in layers:
            if self.rank > 1:
                stats[layer].decompose(self.rank)
            stats[layer].forget_poisoned()
        self.layers_, self.stats_, self.paired_, self.input_shape_ = layers, stats, paired, input_shape
        if self.condition == "target":
            self.gate_quantile_ = quantile
        if all("poisoned" in stats[layer].counts for layer in layers):  # else partial_fit(poisoned=...) completes it
            for layer in layers:
                self._refresh(layer, stats[layer], repairs, len(layers))
            self.repairs_ = repairs
            self._set_gate_thresholds()
        if layer_scores is not None:
            self.layer_scores_ = layer_scores
        return self

    def partial_fit(
        self,
        clean: Data | None = None,
        poisoned: Data | None = None,
        trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> FIRE:
        """Update the running statistics with more inputs (streaming); no input is stored.

        The first call needs ``clean`` (or a prior :meth:`fit`) and named layers. ``trigger`` adds
        the triggered version of ``clean`` as poisoned inputs. Hooks attached by :meth:`attach`
        follow the updates.
        """
        if self.rank > 1:
            raise FireDefenseError("rank > 1 needs all paired differences at once; use fit(), not partial_fit().")
        if trigger is not None and poisoned is not None:
            raise FireDefenseError("give poisoned inputs or a trigger, not both.")
        first = not hasattr(self, "stats_")
        if first:
            self._validate()
            if isinstance(self.layers, str) and self.layers == "auto":
                raise FireDefenseError(
                    "streaming needs named layers (or a first fit() with poisoned data to choose one)."
                )
            if clean is None:
                raise FireDefenseError("the first partial_fit needs the clean reference set.")
            layers = resolve_layers(self.model, self.layers)
        self._check_eval()
        clean_batches = None if clean is None else self._batches(clean, "clean")
        if trigger is not None:
            if clean_batches is None:
                raise FireDefenseError("a trigger needs clean inputs to apply it to.")
            poisoned_batches = [trigger(b) for b in clean_batches]
            for batch in poisoned_batches:
                _check_inputs(batch, "triggered")
        else:
            poisoned_batches = None if poisoned is None else self._batches(poisoned, "poisoned")
        if clean_batches is not None or poisoned_batches is not None:
            self.input_shape_ = self._input_shape(clean_batches, poisoned_batches)
        if first:  # only once the inputs are known to be good
            self.layers_, self.stats_, self.paired_ = layers, {}, False
            if self.condition == "target":
                self.gate_quantile_ = self.gate_quantiles[0]
        streams = self._streams(clean_batches, poisoned_batches)
        if not streams:
            raise FireDefenseError("partial_fit needs clean or poisoned inputs.")
        repairs = getattr(self, "repairs_", {})
        outputs = self._condition_outputs(self.layers_)
        self._gather(streams, self.layers_, self.stats_, repairs, cascade=self.cascade, outputs=outputs)
        self._observe(outputs, clean_batches, poisoned_batches)
        if len(repairs) == len(self.layers_):
            self.repairs_ = repairs  # fitted once every layer has seen clean and poisoned inputs
            self._set_gate_thresholds()
        return self

    # --- the repair ---------------------------------------------------------------------------------------------

    def _hooks(self, scores: dict[str, torch.Tensor] | None = None) -> list:
        """The repair hooks at every repaired layer; they stand aside while FIRE's own passes run."""
        self._require_fitted()
        return [
            (layer, repair_hook(layer, self.repairs_[layer], scores, lambda: self._own_passes == 0))
            for layer in self.layers_
        ]

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
        self._check_eval()
        if self.condition is not None:
            raise FireDefenseError(
                f"condition={self.condition!r} repairs in a second pass that hooks cannot express; "
                "use fire(x) or fire.module()."
            )
        handles = HookHandles(self.model, self._hooks(scores))
        self._attached.append(handles)
        return handles

    def __call__(self, x: torch.Tensor, scores: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The repaired forward pass (``scores``: as :meth:`RepairedModel.forward`).

        ``x`` must be a float batch of the size FIRE was fitted on, without NaN or infinite values (one check per
        call); the hooks of :meth:`attach` and :meth:`module` skip these checks.
        """
        self._check_eval()
        module = self._call_module()
        self._check_forward(x)
        return module(x, scores)

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each layer's projection score ``(N,)`` (``h - mean_clean`` on the unit direction), from a repaired pass."""
        scores: dict[str, torch.Tensor] = {}
        hooks = self._hooks(scores)
        self._check_forward(x)
        with HookHandles(self.model, hooks):
            self.model(x)
        return scores

    def detect(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: the gate's verdict (any layer's score above its clean threshold)."""
        scores = self.scores(x)
        return torch.stack([scores[layer] > self.repairs_[layer].threshold for layer in self.layers_]).any(0)

    def fold(self, example: torch.Tensor, into: str | None = None) -> nn.Module:
        """A copy of the model with the ``shift`` folded into a downstream bias (:func:`fire_defense.fold.fold`)."""
        from fire_defense.fold import fold

        return fold(self, example, into)

    def module(self) -> RepairedModel:
        """The repaired model as an ``nn.Module``: the model and the repair modules (:class:`RepairedModel`)."""
        self._require_fitted()
        condition = getattr(self, "condition_", None)
        key = tuple(self.layers_)
        if condition is not None and key not in self._splits:
            self._splits[key] = split_at(self.model, key)
        split = self._splits.get(key) if condition is not None else None
        resume, head = (None, None) if split is None else ((split[0], split[2]), split[1])
        repairs = {layer: self.repairs_[layer] for layer in self.layers_}
        return RepairedModel(self.model, repairs, condition, resume, head)

    def _call_module(self) -> RepairedModel:
        """:meth:`module`, made once and reused by :meth:`__call__` while the layers, repairs and condition stay."""
        self._require_fitted()
        parts = (self.layers_, [self.repairs_[layer] for layer in self.layers_], getattr(self, "condition_", None))
        cached = self._module
        same = cached is not None and cached[0] == parts[0] and cached[2] is parts[2]
        if not (same and all(a is b for a, b in zip(cached[1], parts[1], strict=True))):
            cached = self._module = (list(parts[0]), parts[1], parts[2], self.module())
        return cached[3]

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
        return {layer: float(self.repairs_[layer].threshold) for layer in self.layers_}

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
                "condition": self.condition,
                "target_share": self.target_share,
                "gate_quantile": getattr(self, "gate_quantile_", None),
                "input_shape": list(self.input_shape_) if hasattr(self, "input_shape_") else None,
            },
            "layers": {layer: stats.state() for layer, stats in self.stats_.items()},
            **(
                {"target_counts": self.condition_.counts.cpu(), "clean_predictions": self.clean_predictions_.cpu()}
                if hasattr(self, "condition_")
                else {}
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> FIRE:
        """Restore what :meth:`state_dict` returned; the model must have the same layers.

        Nothing changes unless the whole state is valid.
        """
        self._refuse_while_attached("load_state_dict()")
        dtype = next(self.model.parameters(), torch.empty(0)).dtype
        try:
            config, saved = state["config"], state["layers"]
            layers = resolve_layers(self.model, config["layers"])
            settings = {key: config[key] for key in ("mode", "alpha", "fpr", "rank", "cascade")}
            # files written before FIRE v2 hold no condition: they load as condition=None
            settings |= {"condition": config.get("condition"), "target_share": config.get("target_share", 0.5)}
            stats = {layer: LayerStatistics.from_state(saved[layer], self._device, dtype) for layer in layers}
            paired, quantile = bool(config["paired"]), config.get("gate_quantile")
            input_shape = config.get("input_shape")  # absent in files written before it was saved
            if input_shape is not None:
                input_shape = tuple(input_shape)
                if not input_shape or not all(is_integer(n) and n >= 1 for n in input_shape):
                    raise FireDefenseError(f"a FIRE state's input_shape must be sizes >= 1, got {list(input_shape)}.")
            counts = state.get("target_counts") if settings["condition"] == "target" else None
            if counts is not None:
                condition = TargetCondition(len(counts), settings["target_share"], self._device)
                condition.update(torch.repeat_interleave(torch.arange(len(counts)), counts.long()))
                clean_predictions = state["clean_predictions"].to(self._device).long()
        except FireDefenseError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
            raise FireDefenseError(f"not a FIRE state dict ({type(error).__name__}: {first_line(error)}).") from None
        if input_shape is not None:
            self._check_eval()
            self._check_layer_shapes(layers, stats, input_shape, dtype)
        previous = {key: getattr(self, key) for key in settings}
        self.__dict__.update(settings)
        try:
            self._validate()
            repairs: dict[str, LayerRepair] = {}
            for layer in layers:
                self._refresh(layer, stats[layer], repairs, len(layers))
        except FireDefenseError:
            self.__dict__.update(previous)
            raise
        self.layers_, self.stats_, self.repairs_, self.paired_ = layers, stats, repairs, paired
        for name in ("condition_", "clean_predictions_", "gate_quantile_", "input_shape_"):
            self.__dict__.pop(name, None)
        if input_shape is not None:
            self.input_shape_ = input_shape
        if counts is not None:
            self.condition_, self.clean_predictions_, self.gate_quantile_ = condition, clean_predictions, quantile
            self._set_gate_thresholds()
        return self

    def _check_layer_shapes(
        self, layers: list[str], stats: dict[str, LayerStatistics], input_shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        """Refuse statistics whose layer shapes are not this model's (a state saved from another model)."""
        found: dict[str, tuple[int, ...]] = {}
        probe = torch.zeros(1, *input_shape, device=self._device, dtype=dtype)
        try:
            with self._own_pass():
                capture_activations(
                    self.model, [probe], layers, lambda layer, out: found.setdefault(layer, tuple(out.shape[1:]))
                )
        except RuntimeError as error:
            raise FireDefenseError(
                f"the model does not take the inputs {list(input_shape)} this FIRE state was fitted on "
                f"({first_line(error)}); load a state saved from this model."
            ) from None
        for layer in layers:
            if found[layer] != tuple(stats[layer].shape):
                raise FireDefenseError(
                    f"this FIRE state was saved from another model: its {layer} activations are "
                    f"{tuple(stats[layer].shape)}, this model's {found[layer]}; load a state saved from this model."
                )

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
                f"{path} is not a FIRE state file that loads safely ({torch_load_reason(error)}); "
                "load a file written by FIRE.save()."
            ) from None
        return self.load_state_dict(state)


def _check_inputs(batch: torch.Tensor, what: str) -> None:
    """Refuse a batch FIRE would turn into meaningless numbers: uint8 images, or NaN / infinite values."""
    name = f"the {what} inputs" if what else "inputs"
    if batch.dtype in (torch.uint8, torch.bool):
        raise FireDefenseError(
            f"{name} are {batch.dtype}; give the float tensors the model takes (uint8 images: x.float() / 255)."
        )
    # a finite sum means every value is finite (a NaN or an infinity makes it NaN or infinite); only where it is
    # not (a NaN, or finite values whose sum overflows) does the element-wise test decide
    if batch.is_floating_point() and not math.isfinite(batch.sum().item()) and not bool(torch.isfinite(batch).all()):
        raise FireDefenseError(f"{name} hold NaN or infinite values; drop or repair those inputs.")


class RepairedModel(nn.Module):
    """A model with repair modules at named layers: ``fire.module()(x) == fire(x)``.

    The repairs (and the condition) are submodules, so ``.to()`` moves them with the model and
    ``state_dict()`` holds their buffers beside the model's weights. Hooks are attached for each
    forward call only. With a ``condition``, the model first runs unrepaired, and only the inputs
    the condition selects run again, repaired: from the first repaired layer's stored output
    through ``resume`` where one is given, else through the whole model. Where the condition
    selects every class (no single target was inferred, as under an all-to-all attack) and at most
    one layer is gated, one hooked pass gives the same logits, and only it runs. With one repaired
    layer, a ``head`` and no hook on the model itself, the first pass runs as ``rest(head(x))``, which
    keeps the layer's output without a hook (the same operations, the same logits); a hook on the
    model (a counter of its calls) sees every pass, as without a head.

    Args:
        model: The classifier.
        repairs: ``{layer name: repair module}``, applied in this order.
        condition: Selects the inputs to repair from the unrepaired logits (default: every input).
        resume: ``(layer, rest)`` from :func:`fire_defense.split.split_at`: ``rest`` maps that
            repaired layer's output to the logits (it shares the model's modules, so it is not a submodule).
        head: With ``resume``, the model's part up to that layer's output (from :func:`~fire_defense.split.split_at`).
    """

    def __init__(
        self,
        model: nn.Module,
        repairs: Mapping[str, LayerRepair],
        condition: TargetCondition | None = None,
        resume: tuple[str, nn.Module] | None = None,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.layers = list(repairs)
        self.repairs = nn.ModuleList(repairs.values())
        self.condition = condition
        self.resume = resume
        self._head = (head,) if head is not None and resume is not None else None  # a tuple: not a submodule
        self._cached_settings: tuple[list, tuple[bool, list[bool]]] | None = None  # see _settings

    def _one_pass(self, pairs: list[tuple[str, LayerRepair]]) -> list[torch.Tensor | None] | None:
        """Where one hooked pass gives the same logits as two, each layer's gate threshold for it (``None``: no
        gate), else ``None``: with no condition, or a condition that selects every class (no single target was
        inferred: every input is repaired) and at most one gated layer, which then decides in the same pass."""
        if self.condition is None:
            return [None] * len(pairs)
        every_class, gated = self._settings()
        if not every_class:
            return None
        thresholds = [r.select_threshold if gate else None for (_, r), gate in zip(pairs, gated, strict=True)]
        return thresholds if len(pairs) == 1 or all(t is None for t in thresholds) else None

    def _settings(self) -> tuple[bool, list[bool]]:
        """Whether the condition selects every class, and whether each layer's gate is set (a threshold above
        ``-inf``): read from the buffers only when one of them was replaced or changed in place since the last call
        (a tensor's version counter), so a forward pass spends no tensor operation on them."""
        assert self.condition is not None
        buffers = [self.condition.mask, *(repair.select_threshold for repair in self.repairs)]
        try:
            key = [(tensor, tensor._version) for tensor in buffers]
        except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
            key = None
        cached = self._cached_settings
        if (
            key is None
            or cached is None
            or not all(a is b and u == v for (a, u), (b, v) in zip(key, cached[0], strict=True))
        ):
            settings = bool(buffers[0].all()), [not bool(torch.isneginf(t)) for t in buffers[1:]]
            self._cached_settings = None if key is None else (key, settings)
            return settings
        return cached[1]

    def _split(self) -> bool:
        """Whether the first pass can run as ``rest(head(x))``: one layer, a head, and no hook that the cut would
        skip (on the model or a module the trace inlines on the way to the layer, or a global one)."""
        return self._head is not None and len(self.layers) == 1 and not hooks_on_path(self.model, self.layers)

    def forward(self, x: torch.Tensor, scores: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Repaired logits; ``scores``, if given, gets each layer's projection score of the first pass."""
        pairs = list(zip(self.layers, self.repairs, strict=True))
        thresholds = self._one_pass(pairs)
        if self._split():
            return self._split_forward(x, scores, thresholds)
        if thresholds is not None:
            gated = zip(pairs, thresholds, strict=True)
            hooks = [(layer, repair_hook(layer, r, scores, above=threshold)) for (layer, r), threshold in gated]
            with HookHandles(self.model, hooks):
                return self.model(x)
        first: dict[str, torch.Tensor] = {} if scores is None else scores
        hooks = [(layer, repair_hook(layer, r, first, apply=False)) for layer, r in pairs]
        stored: list[torch.Tensor] = []
        if self.resume is not None:
            start = self.resume[0]
            hooks.append((start, lambda module, inputs, output: stored.append(tensor_output(start, output))))
        with HookHandles(self.model, hooks):
            logits = self.model(x)
        selected = self.condition(logits)
        for layer, repair in pairs:
            selected = selected & (first[layer] > repair.select_threshold.to(first[layer]))
        if not bool(selected.any()):
            return logits
        with HookHandles(self.model, [(layer, repair_hook(layer, repair)) for layer, repair in pairs]):
            if self.resume is None:
                repaired = self.model(x[selected])
            else:
                start, rest = self.resume
                repaired = rest(self.repairs[self.layers.index(start)](stored[0][selected]))
        return logits.index_put((selected,), repaired)

    def _split_forward(
        self, x: torch.Tensor, scores: dict[str, torch.Tensor] | None, thresholds: list[torch.Tensor | None] | None
    ) -> torch.Tensor:
        """:meth:`forward` with the first pass as ``rest(head(x))``: the same operations, with no hook to attach."""
        assert self._head is not None and self.resume is not None
        (head,), (layer, rest), repair = self._head, self.resume, self.repairs[0]
        output = tensor_output(layer, head(x))
        if thresholds is not None:  # one pass repairs (the inputs above the gate)
            return rest(apply_repair(layer, repair, output, scores, above=thresholds[0]))
        gated = self._settings()[1][0]
        score = repair.score(output) if scores is not None or gated else None
        if scores is not None:
            scores[layer] = score
        logits = rest(output)
        selected = self.condition(logits)
        if gated:
            selected = selected & (score > repair.select_threshold.to(score))
        rows = selected.nonzero().flatten()  # one operation tells whether any input is selected, and which
        if not len(rows):
            return logits
        return logits.index_put((rows,), rest(repair(output[rows])))

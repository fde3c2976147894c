"""The one interface every runtime (inference-time) defense implements, FIRE included, and its registry.

A runtime defense keeps the deployed model as it is. It is fitted once on the defender's data,
never on what it is scored on:

- ``model``: the classifier of ``[0, 1]`` images ``(N, C, H, W)`` (normalisation inside it);
- ``clean``: the defender's clean reference inputs;
- ``poisoned``: ``k`` poisoned inputs seen in operation (only defenses that declare ``"poisoned"``
  in :attr:`RuntimeDefense.needs` are given them);
- ``trigger``: a function that adds the trigger to ``[0, 1]`` images (declared ``"trigger"``:
  the true trigger, an upper bound for what a reverse-engineering tool would give);
- ``clean_labels``: the clean reference's true labels (declared ``"labels"``; BackdoorBench's
  convention: defenses get labelled clean training data). ``fit`` stores them as ``clean_labels_``
  for :meth:`RuntimeDefense._fit`; a defense that does not declare the need never sees them.

Then :meth:`RuntimeDefense.predict` returns labels, with :data:`~fire_defense.metrics.REJECTED`
where a detector refuses an input, and :meth:`RuntimeDefense.score` a per-sample suspicion
(higher: more likely poisoned) where the defense has one. :attr:`RuntimeDefense.forward_passes`
declares the cost: forward passes of the model per input classified (a test counts them).
A detector calibrated at a clean false-positive rate uses :func:`calibrate_threshold`, whose
:class:`Threshold` breaks ties at the boundary at random (seeded), so discrete scores reject at
the stated rate instead of nothing.

Hyperparameters are constructor arguments stored under the same names; what ``fit`` learns ends
in ``_`` (scikit-learn's conventions). Adding a defense is one file with a registered subclass,
imported in ``fire_bench.defenses``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from fire_defense import FireDefenseError, NotFittedError, Registry, candidate_layers, drop_none, resolve_layers
from fire_defense.device import module_device
from fire_defense.metrics import REJECTED
from fire_defense.registry import keyword_parameters

__all__ = [
    "DEFENSES",
    "Decision",
    "RuntimeDefense",
    "Threshold",
    "Trigger",
    "calibrate_threshold",
    "create_defense",
    "fixed_or_calibrated",
    "list_defenses",
    "neuron_view",
    "per_neuron",
    "register_defense",
]

Trigger = Callable[[torch.Tensor], torch.Tensor]
"""Adds the trigger to a batch of ``[0, 1]`` images, returning images of the same shape."""


class Threshold(NamedTuple):
    """A detector's boundary: scores above ``value`` are rejected, and scores equal to it with probability ``tie``.

    ``tie = 1`` is the plain rule ``score >= value``, ``tie = 0`` the strict ``score > value``; in between, the
    boundary splits a tie at random (seeded), a randomised test whose clean rejection rate is exactly the
    calibrated one even where many clean scores share the boundary value.
    """

    value: float
    tie: float = 1.0


def calibrate_threshold(scores: torch.Tensor, fpr: float) -> Threshold:
    """The boundary that rejects exactly a share ``fpr`` of ``scores`` (higher: more suspicious), ties included.

    ``value`` is the smallest score ``v`` with at most ``fpr`` of the scores above it; the scores equal to
    ``v`` are then rejected with probability ``tie = (fpr - share above v) / share at v``, so the expected
    rejection rate on ``scores`` is ``fpr`` whatever the ties (with distinct scores: ``>=`` at the empirical
    ``1 - fpr`` quantile, give or take one sample). Scores are compared in float32, as detectors return them.

    Raises:
        FireDefenseError: ``fpr`` is not in ``(0, 1)`` or ``scores`` is empty or not finite.
    """
    if not 0 < fpr < 1:
        raise FireDefenseError(f"fpr must be in (0, 1), got {fpr}; pass e.g. fpr=0.01.")
    scores = scores.detach().flatten().float().cpu()
    if not len(scores) or not torch.isfinite(scores).all():
        raise FireDefenseError("cannot calibrate a threshold on empty or non-finite clean scores; check the model.")
    values, counts = scores.unique(sorted=True, return_counts=True)
    above = (counts.flip(0).cumsum(0).flip(0) - counts).double() / len(scores)  # share strictly above each value
    value = int(torch.nonzero(above <= fpr)[0])  # above decreases along the values: the first that fits
    at = float(counts[value]) / len(scores)
    return Threshold(float(values[value]), min(1.0, (fpr - float(above[value])) / at))


def fixed_or_calibrated(fixed: float | None, scores: torch.Tensor, fpr: float) -> Threshold:
    """``Threshold(fixed)`` where a detector was given one, else :func:`calibrate_threshold` of ``scores``."""
    return calibrate_threshold(scores, fpr) if fixed is None else Threshold(float(fixed))


class Decision(NamedTuple):
    """What a defense says about a batch: labels (``REJECTED`` for refused inputs) and scores, if any."""

    labels: torch.Tensor
    scores: torch.Tensor | None


class RuntimeDefense(ABC):
    """A defense that acts at inference time on a fixed model (see the module docstring).

    Subclasses set the class attributes, implement :meth:`_fit` and :meth:`_decide`, and take their
    hyperparameters as keyword arguments.

    Args:
        batch_size: Inputs per call of :meth:`_decide` (a defense may run many passes per input).
        pass_batch: Images per forward pass of the model, for a defense that runs many per input
            (blends, corruptions, scaled copies): bounds memory, and on a CPU small batches that
            stay in cache run fastest (64 is ~1.8x faster per image than 128 for the embedded
            default's model on one core). Raise it on a GPU.
        seed: Seeds every random choice the defense makes (a ``torch.Generator`` made in ``fit``).
    """

    name: ClassVar[str] = ""
    rejects: ClassVar[bool] = False  # a detector: refuses inputs instead of correcting them
    # forward_passes is measured at fit on the clean reference (some inputs run a second pass), not fixed
    cost_varies: ClassVar[bool] = False
    needs: frozenset[str] = frozenset()  # of {"poisoned", "trigger", "labels"}; a property where it depends on params
    source: ClassVar[str] = ""  # the paper it follows

    def __init__(self, *, batch_size: int = 256, pass_batch: int = 64, seed: int = 0) -> None:
        self.batch_size = batch_size
        self.pass_batch = pass_batch
        self.seed = seed

    # --- what subclasses implement ---------------------------------------------------------------------------

    @property
    @abstractmethod
    def forward_passes(self) -> float:
        """Forward passes of the model per input classified (the declared cost)."""

    @abstractmethod
    def _fit(self, clean: torch.Tensor, poisoned: torch.Tensor | None, trigger: Trigger | None) -> None:
        """Learn from the defender's data; ``self.model_`` and ``self.generator_`` are set."""

    @abstractmethod
    def _decide(self, x: torch.Tensor) -> Decision:
        """Labels (and scores) for one batch on the model's device."""

    # --- the interface ---------------------------------------------------------------------------------------

    def fit(
        self,
        model: nn.Module,
        clean: torch.Tensor,
        poisoned: torch.Tensor | None = None,
        trigger: Trigger | None = None,
        clean_labels: torch.Tensor | None = None,
    ) -> RuntimeDefense:
        """Fit on the defender's data (module docstring) and return ``self``.

        Raises:
            FireDefenseError: the model is training, ``clean`` is empty or not an image batch, ``clean_labels``
                is not one integer label per clean input, or a declared need (``poisoned`` / ``trigger`` /
                ``labels``) is missing.
        """
        if self.batch_size < 1 or self.pass_batch < 1:
            raise FireDefenseError(
                f"{self.name}: batch_size and pass_batch must be >= 1, got {self.batch_size} and {self.pass_batch}."
            )
        if model.training:
            raise FireDefenseError(f"{self.name}: the model is in training mode; call model.eval() first.")
        for what, data in (("clean", clean), ("poisoned", poisoned)):
            if data is not None and (not isinstance(data, torch.Tensor) or data.ndim != 4 or len(data) == 0):
                raise FireDefenseError(f"{self.name}: {what} inputs must be a non-empty (N, C, H, W) tensor.")
        if clean_labels is not None and (
            not isinstance(clean_labels, torch.Tensor)
            or clean_labels.shape != (len(clean),)
            or clean_labels.is_floating_point()
            or clean_labels.is_complex()
        ):
            raise FireDefenseError(
                f"{self.name}: clean_labels must be an integer tensor of one label per clean input ({len(clean)},)."
            )
        given = {"poisoned": poisoned, "trigger": trigger, "labels": clean_labels}
        missing = [need for need in sorted(self.needs) if given[need] is None]
        if missing:
            argument = "clean_labels" if missing[0] == "labels" else missing[0]
            raise FireDefenseError(f"{self.name} needs {' and '.join(missing)} to fit; pass {argument}=...")
        self.model_ = model
        self.generator_ = torch.Generator().manual_seed(self.seed)
        device = module_device(model)
        self.clean_labels_ = clean_labels.long().to(device) if "labels" in self.needs else None
        self._fit(
            clean.to(device),
            poisoned.to(device) if poisoned is not None and "poisoned" in self.needs else None,
            trigger if "trigger" in self.needs else None,
        )
        return self

    def decide(self, x: torch.Tensor) -> Decision:
        """Labels and scores for ``x``, computed ``batch_size`` inputs at a time on the model's device."""
        if not hasattr(self, "model_"):
            raise NotFittedError(f"{self.name} is not fitted yet; call fit(model, clean, ...) first.")
        device = module_device(self.model_)
        labels, scores = [], []
        with torch.inference_mode():
            for batch in x.split(self.batch_size):
                decision = self._decide(batch.to(device))
                labels.append(decision.labels.cpu())
                scores.append(None if decision.scores is None else decision.scores.float().cpu())
        has_scores = all(s is not None for s in scores)
        return Decision(torch.cat(labels), torch.cat(scores) if has_scores and scores else None)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Labels for ``x``; :data:`REJECTED` where a detector refuses the input."""
        return self.decide(x).labels

    def score(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-sample suspicion (higher: more likely poisoned), or ``None`` if the defense has none."""
        return self.decide(x).scores

    def params(self) -> dict[str, Any]:
        """The hyperparameters (constructor arguments), as stored."""
        return {name: getattr(self, name) for name in keyword_parameters(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    # --- helpers for subclasses ------------------------------------------------------------------------------

    def _logits(self, x: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """One forward pass of the model (or of ``model``, a modified copy) per image, ``pass_batch`` at a time."""
        model = self.model_ if model is None else model
        if len(x) <= self.pass_batch:
            return model(x)
        return torch.cat([model(part) for part in x.split(self.pass_batch)])

    def _check_images(self, x: torch.Tensor, like: torch.Tensor | None = None, min_size: int = 1) -> None:
        """Refuse anything but ``[0, 1]`` images ``(N, C, H, W)``: of ``like``'s image shape, ``min_size`` a side.

        For a defense whose statistics assume unnormalised pixels (the detectors).
        """
        if x.ndim != 4 or min(x.shape[-2:]) < min_size or (like is not None and x.shape[1:] != like.shape[1:]):
            shape = "(N, C, H, W)" if like is None else f"(N, {', '.join(map(str, like.shape[1:]))}) as the reference"
            size = f" of at least {min_size} pixels a side" if min_size > 1 else ""
            raise FireDefenseError(f"{self.name}: inputs must be {shape} images{size}, got shape {tuple(x.shape)}.")
        if len(x) and (x.min() < 0 or x.max() > 1):
            raise FireDefenseError(
                f"{self.name}: inputs must be [0, 1] images; normalisation belongs inside the model."
            )

    def _layer(self, layer: str | int) -> str:
        """The dotted name of ``layer`` in the model: a name, ``'last'`` (its last stage output) or an integer, the
        position in its stage outputs (:func:`~fire_defense.candidate_layers`; ``2``: a PreAct-ResNet's ``layer3``),
        a rule that carries over to other architectures where a name would not."""
        if isinstance(layer, str) and layer != "last":
            return resolve_layers(self.model_, layer)[0]
        stages = candidate_layers(self.model_)
        if not stages:
            raise FireDefenseError(f"{self.name}: the model has no known stage outputs; name the layer.")
        if layer == "last":
            return stages[-1]
        if isinstance(layer, bool) or not isinstance(layer, int) or not -len(stages) <= layer < len(stages):
            raise FireDefenseError(
                f"{self.name}: layer {layer!r} is not a stage position of this model, which has {len(stages)} "
                f"stage outputs ({', '.join(stages)}); pass an integer from {-len(stages)} to {len(stages) - 1} "
                "or a name."
            )
        return stages[layer]

    def _reject_above(self, labels: torch.Tensor, scores: torch.Tensor, threshold: float | Threshold) -> Decision:
        """The detector's decision: ``labels``, with inputs scoring above ``threshold`` rejected.

        A float rejects ``scores > threshold``; a :class:`Threshold` also rejects scores equal to its value with
        probability ``tie`` (drawn from ``generator_`` only where that is strictly between 0 and 1).
        """
        if not isinstance(threshold, Threshold):
            return Decision(torch.where(scores > threshold, torch.full_like(labels, REJECTED), labels), scores)
        value = torch.tensor(threshold.value, dtype=torch.float32, device=scores.device)
        scores32 = scores.float()
        reject = scores32 > value
        if threshold.tie >= 1:
            reject |= scores32 == value
        elif threshold.tie > 0:
            draws = torch.rand(len(scores), generator=self.generator_).to(scores.device)
            reject |= (scores32 == value) & (draws < threshold.tie)
        return Decision(torch.where(reject, torch.full_like(labels, REJECTED), labels), scores)


def per_neuron(activations: torch.Tensor) -> torch.Tensor:
    """``(samples, neurons)`` of a layer's output: a conv map's channels pool over positions; other units stay."""
    if activations.ndim == 4:
        return activations.transpose(0, 1).flatten(1).T
    return activations.flatten(1)


def neuron_view(values: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-neuron ``values`` (from :func:`per_neuron`) shaped to broadcast over ``output``, in its dtype."""
    shape = (1, -1, 1, 1) if output.ndim == 4 else (1, *output.shape[1:])
    return values.view(shape).to(output.dtype)


DEFENSES: Registry[type[RuntimeDefense]] = Registry("defense")


def register_defense(cls: type[RuntimeDefense]) -> type[RuntimeDefense]:
    """Class decorator: store a defense under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    return DEFENSES.add(cls.name, cls)


def create_defense(name: str, **params: Any) -> RuntimeDefense:
    """The defense called ``name`` with ``params`` (``None`` values keep the defaults).

    Raises:
        UnknownNameError: no such defense.
        FireDefenseError: a parameter the defense does not take.
    """
    cls = DEFENSES.get(name)
    try:
        return cls(**drop_none(params))
    except TypeError as error:
        raise FireDefenseError(f"defense {name!r}: {error}. See `fire-bench defenses` for its parameters.") from None


def list_defenses(pattern: str = "*") -> list[str]:
    """Registered defense names matching ``pattern``, sorted."""
    return DEFENSES.names(pattern)

"""The interface every poisoning attack implements, and the registry that names them.

An attack is a trigger on uint8 images ``(N, H, W, C)`` (applied before normalisation, as
BackdoorBench stores poisoned images) plus a label rule (all-to-one: every poisoned sample goes
to ``target``; all-to-all: label ``y`` goes to ``(y + 1) % classes``) and a choice of which
training samples to poison. Attacks whose trigger changes during training (WaNet's noise mode,
Input-aware's generator) also hook into the training loop; the others need no hook.

Hyperparameters are constructor arguments stored under the same names (scikit-learn's
convention), so :meth:`Attack.params` rebuilds the attack; learned or random trigger state
(a WaNet grid, a generator's weights) is in :meth:`Attack.state_dict`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fire_adapters.datasets import DatasetSpec, get_dataset_spec
from fire_adapters.images import ImageSet
from fire_defense import FireDefenseError, Registry, drop_none
from fire_defense.checks import is_finite_number, is_integer
from fire_defense.registry import keyword_defaults, keyword_parameters

__all__ = [
    "ATTACKS",
    "Attack",
    "create_attack",
    "list_attacks",
    "partners",
    "pick",
    "register_attack",
]


def pick(positions: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` of ``positions`` drawn without replacement (all of them if there are fewer)."""
    return positions[torch.randperm(len(positions), generator=generator)[:count].to(positions.device)]


def partners(chosen: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """For each position in ``chosen``, another position in ``range(size)``, never itself."""
    offsets = torch.randint(1, size, (len(chosen),), generator=generator).to(chosen.device)
    return (chosen + offsets) % size


class Attack:
    """A backdoor poisoning attack.

    Subclasses take their own hyperparameters as keyword-only arguments and pass the common ones
    below through ``**common`` to this constructor.

    Args:
        dataset: The dataset attacked (its image size, channels and classes shape the trigger).
        target: The target label of an all-to-one attack.
        ratio: Share of the training set that is poisoned (BackdoorBench's ``pratio``).
        all_to_all: Send label ``y`` to ``(y + 1) % classes`` instead of to ``target``.
        seed: Seeds the choice of poisoned samples and the trigger's random parts, except those an
            attack fixes with a parameter of its own (Blended's ``pattern_seed``: one pattern across seeds,
            as BackdoorBench's one image).
    """

    name: ClassVar[str] = ""
    clean_label: ClassVar[bool] = False  # poison only training samples of the target class, keeping labels
    sample_specific: ClassVar[bool] = False  # the trigger differs from one image to the next
    static_trigger: ClassVar[bool] = True  # False: the trigger is applied per batch while training (it is learned)

    def __init__(
        self,
        dataset: str | DatasetSpec,
        *,
        target: int = 0,
        ratio: float = 0.1,
        all_to_all: bool = False,
        seed: int = 0,
    ) -> None:
        self.dataset = get_dataset_spec(dataset)
        self.target = target
        self.ratio = ratio
        self.all_to_all = all_to_all
        self.seed = seed
        if not 0 <= target < self.dataset.num_classes:
            raise FireDefenseError(
                f"target {target} is not a {self.dataset.name} class (0..{self.dataset.num_classes - 1})."
            )
        if not 0 < ratio <= 1:
            raise FireDefenseError(f"ratio must be in (0, 1], got {ratio}.")
        if all_to_all and self.clean_label:
            raise FireDefenseError(f"{self.name} is a clean-label attack; it has no all-to-all form.")

    # --- the trigger -------------------------------------------------------------------------------------------

    def apply(self, images: np.ndarray) -> np.ndarray:
        """The triggered version of uint8 images ``(N, H, W, C)``."""
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.dataset.img_size:
            raise FireDefenseError(
                f"{self.name} expects uint8 {self.dataset.name} images "
                f"(N, {', '.join(map(str, self.dataset.img_size))}), got {images.dtype} {images.shape}."
            )
        return self.apply(images)

    # --- labels and which samples ------------------------------------------------------------------------------

    def target_labels(self, labels: np.ndarray) -> np.ndarray:
        """The labels the attacker wants for poisoned samples whose true labels are ``labels``."""
        labels = np.asarray(labels, dtype=np.int64)
        if self.all_to_all:
            return (labels + 1) % self.dataset.num_classes
        return np.full_like(labels, self.target)

    def test_positions(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the test samples to poison: those whose label the attack changes (BackdoorBench's rule)."""
        labels = np.asarray(labels, dtype=np.int64)
        return np.flatnonzero(self.target_labels(labels) != labels)

    def train_positions(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the training samples to poison, drawn with ``seed``, sorted.

        ``round(ratio * N)`` samples from the whole set, or, for a clean-label attack, from the target
        class (all of it if it is smaller), as BackdoorBench's ``generate_poison_index_from_label_transform``.
        """
        labels = np.asarray(labels, dtype=np.int64)
        pool = np.flatnonzero(labels == self.target) if self.clean_label else np.arange(len(labels))
        count = min(round(self.ratio * len(labels)), len(pool))
        if count == 0:
            raise FireDefenseError(f"ratio {self.ratio} poisons no sample of a {len(labels)}-sample training set.")
        return np.sort(np.random.default_rng(self.seed).choice(pool, size=count, replace=False))

    def poison(self, split: ImageSet, positions: np.ndarray) -> ImageSet:
        """The samples at ``positions`` with the trigger applied and the attacker's labels as ``targets``.

        (A clean-label attack poisons target-class training samples, whose target is their own label.)
        """
        chosen = split.subset(positions)
        return ImageSet(self(chosen.images), chosen.labels, chosen.indices, self.target_labels(chosen.labels))

    # --- training hooks (attacks whose trigger changes while the model trains) ---------------------------------

    def prepare(self, train: ImageSet, device: torch.device, generator: torch.Generator) -> None:
        """Called once before training (e.g. Input-aware pre-trains its mask generator)."""

    def training_batch(
        self, images: torch.Tensor, labels: torch.Tensor, poisoned: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Adjust an augmented training batch in [0, 1]; return ``(images, labels, extra_loss or None)``.

        ``poisoned`` marks the samples at the poisoned positions. With a static trigger they already
        carry the trigger and the target label; otherwise they are clean and this hook poisons the batch.
        """
        return images, labels, None

    def feature_layers(self, model: nn.Module) -> list[str]:
        """Names in ``model.named_modules()`` whose outputs :meth:`feature_loss` gets; none by default."""
        return []

    def feature_loss(self, features: dict[str, torch.Tensor], poisoned: torch.Tensor) -> torch.Tensor | None:
        """A loss on the batch's activations at :meth:`feature_layers` (with their graph), added to the victim's.

        Called after each forward pass with ``poisoned`` the batch's mask; ``None`` (the default) adds nothing.
        """
        return None

    def trigger_networks(self) -> nn.Module | None:
        """Networks that make the trigger (saved in :meth:`state_dict`, moved to the training device)."""
        return None

    def trigger_optimizer(self) -> torch.optim.Optimizer | None:
        """Optimizer that trains the trigger networks along with the victim, or ``None`` if they stay fixed."""
        return None

    # --- persistence -------------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this attack (the dataset by name)."""
        return {"dataset": self.dataset.name, **{name: getattr(self, name) for name in keyword_parameters(type(self))}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trigger state that :meth:`params` alone does not rebuild (learned weights); empty by default."""
        networks = self.trigger_networks()
        return {} if networks is None else {k: v.detach().cpu().clone() for k, v in networks.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Attack:
        networks = self.trigger_networks()
        if networks is not None:
            networks.load_state_dict(state)
        elif state:
            raise FireDefenseError(f"{self.name} keeps no trigger state, but state was given: {sorted(state)[:3]}.")
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


ATTACKS: Registry[type[Attack]] = Registry("attack")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: register an attack under its ``name``."""
    return ATTACKS.add(cls.name, cls)


def create_attack(name: str, dataset: str | DatasetSpec, **kwargs: Any) -> Attack:
    """Build a registered attack; ``None`` keyword arguments keep the attack's defaults.

    Raises:
        UnknownNameError: no such attack.
        FireDefenseError: a keyword the attack does not take; the message lists those it does.
    """
    cls = ATTACKS.get(name)
    defaults = keyword_defaults(cls)
    accepted = list(defaults)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise FireDefenseError(f"attack {name!r} takes no {', '.join(unknown)}; its parameters: {', '.join(accepted)}.")
    kwargs = drop_none(kwargs)
    for key, value in kwargs.items():
        _check_kind(name, key, value, defaults[key])
    return cls(dataset, **kwargs)


def _check_kind(attack: str, key: str, value: Any, default: Any) -> None:
    """Refuse a parameter of another kind than its default: an integer for an int, a finite number for a float."""
    if isinstance(default, bool):
        kind, ok = "True or False", isinstance(value, (bool, np.bool_))
    elif isinstance(default, int):
        kind, ok = "an integer", is_integer(value)
    elif isinstance(default, float):
        kind, ok = "a finite number", is_finite_number(value)
    else:
        return
    if not ok:
        raise FireDefenseError(f"attack {attack!r}: {key} must be {kind}, got {value!r}.")


def list_attacks(pattern: str = "*") -> list[str]:
    """Registered attack names, sorted."""
    return ATTACKS.names(pattern)

"""One trainer for backdoored models, and the evaluation every later step shares.

SGD with Nesterov momentum (or AdamW) and a one-cycle learning rate, on batches augmented as BackdoorBench
trains (random crop with 4 pixels of zero padding; horizontal flip on CIFAR-10 only). Poisoned
samples carry the attack's trigger and target label; attacks whose trigger is learned or
randomised per batch (Input-aware, WaNet's noise mode) adjust each batch through
:meth:`Attack.training_batch`; an attack with a loss on the victim's activations (FIRE-aware) adds it
through :meth:`Attack.feature_loss`. Everything random is drawn from generators seeded by ``seed``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fire_adapters.attacks.base import Attack
from fire_adapters.images import ImageSet
from fire_adapters.preprocess import to_tensor, with_normalization
from fire_defense import FireDefenseError, resolve_device
from fire_defense.checks import is_finite_number, is_integer
from fire_defense.layers import HookFn, HookHandles, tensor_output
from fire_defense.metrics import backdoor_metrics, predict
from fire_defense.progress import progress_bar

__all__ = ["OPTIMIZERS", "TrainConfig", "augment", "evaluate", "train_backdoored_model"]

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """How a backdoored model is trained.

    Attributes:
        epochs: Passes over the (poisoned) training set.
        batch_size: Samples per step.
        lr: Peak learning rate of the one-cycle schedule.
        momentum: SGD (Nesterov) momentum.
        weight_decay: L2 penalty (SGD), decoupled weight decay (AdamW).
        optimizer: ``"sgd"`` (Nesterov) or ``"adamw"``, both under the same one-cycle schedule.
    """

    epochs: int = 4
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        checks = {
            "epochs must be an integer >= 1": is_integer(self.epochs) and self.epochs >= 1,
            "batch_size must be an integer >= 1": is_integer(self.batch_size) and self.batch_size >= 1,
            "lr must be a finite number > 0": is_finite_number(self.lr) and self.lr > 0,
            "momentum must be in [0, 1)": is_finite_number(self.momentum) and 0 <= self.momentum < 1,
            "weight_decay must be a finite number >= 0": is_finite_number(self.weight_decay) and self.weight_decay >= 0,
            f"optimizer must be one of {', '.join(OPTIMIZERS)}": self.optimizer in OPTIMIZERS,
        }
        problems = [problem for problem, ok in checks.items() if not ok]
        if problems:
            raise FireDefenseError(f"training settings: {'; '.join(problems)} (got {self}).")

    def as_dict(self) -> dict[str, Any]:
        """The settings as a record stores them (``optimizer`` only when not SGD: earlier records keep their recipe)."""
        stored = asdict(self)
        if self.optimizer == "sgd":
            del stored["optimizer"]
        return stored


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``config`` names, on ``model``'s parameters (its learning rate the one-cycle schedule's peak)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )


def augment(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy (and a random horizontal flip)."""
    n, _, height, width = images.shape
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        flipped = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


@torch.inference_mode()
def evaluate(
    classifier: nn.Module,
    clean: ImageSet,
    poisoned: ImageSet,
    device: torch.device | str | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """``test_acc`` on ``clean``, ``test_asr`` and ``test_ra`` on ``poisoned``, for a classifier of [0, 1] images."""
    if poisoned.targets is None:
        raise FireDefenseError("the poisoned set has no targets (the attacker's labels).")
    device = resolve_device(device)
    classifier = classifier.to(device).eval()
    clean_pred = predict(classifier, to_tensor(clean.images), batch_size, device)
    poisoned_pred = predict(classifier, to_tensor(poisoned.images), batch_size, device)
    return backdoor_metrics(clean_pred, clean.labels, poisoned_pred, poisoned.labels, poisoned.targets)


def _keep(store: dict[str, torch.Tensor], name: str) -> HookFn:
    """A forward hook that puts the layer's output, graph and all, into ``store[name]``."""

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        store[name] = tensor_output(name, output)

    return hook


def train_backdoored_model(
    model: nn.Module,
    attack: Attack,
    train: ImageSet,
    positions: np.ndarray,
    config: TrainConfig,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` (normalised inputs, as in BackdoorBench) on ``train`` with ``positions`` poisoned.

    Args:
        model: The victim, freshly initialised; trained in place and left on the CPU in eval mode.
        attack: Makes the trigger and the target labels.
        train: The clean training split.
        positions: Positions in ``train`` to poison (see :meth:`Attack.train_positions`).
        config: Optimiser and schedule.
        seed: Seeds batch order, augmentation and per-batch attack randomness.
        device: Where to train (default: CUDA if available).
        progress: Show a progress bar.

    Returns:
        One row per epoch: ``epoch``, ``train_loss``, ``train_acc`` (on the samples as trained), ``seconds``.
    """
    device = resolve_device(device)
    generator = torch.Generator().manual_seed(seed)
    spec = attack.dataset
    images, labels = train.images.copy(), train.labels.copy()
    if attack.static_trigger:  # otherwise the attack poisons each batch itself (Attack.training_batch)
        labels[positions] = attack.target_labels(labels[positions])
        images[positions] = attack(images[positions])
    poisoned_mask = torch.zeros(len(train), dtype=torch.bool)
    poisoned_mask[torch.from_numpy(positions)] = True
    data, targets = torch.from_numpy(images), torch.from_numpy(labels)

    networks = attack.trigger_networks()
    if networks is not None:
        networks.to(device)
    attack.prepare(train, device, generator)
    attack_optimizer = attack.trigger_optimizer()
    feature_layers = attack.feature_layers(model)  # where Attack.feature_loss reads activations; usually none

    classifier = with_normalization(model, spec).to(device, memory_format=torch.channels_last)  # faster convs
    optimizer = _optimizer(model, config)
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        raise FireDefenseError(f"the training set ({len(train)}) is smaller than one batch ({config.batch_size}).")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.epochs * steps_per_epoch)
    history = []
    bar = progress_bar(
        total=config.epochs * steps_per_epoch, desc=f"train {attack.name}", unit="step", disable=not progress
    )
    for epoch in range(1, config.epochs + 1):
        started, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
        classifier.train()
        order = torch.randperm(len(train), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = to_tensor(data[batch], device)
            y, poisoned = targets[batch].to(device), poisoned_mask[batch].to(device)
            x = augment(x, spec.random_crop_padding, spec.horizontal_flip, generator)
            x, y, extra_loss = attack.training_batch(x, y, poisoned, generator)
            features: dict[str, torch.Tensor] = {}
            with HookHandles(model, [(name, _keep(features, name)) for name in feature_layers]):
                logits = classifier(x)
            loss = F.cross_entropy(logits, y)
            total = loss if extra_loss is None else loss + extra_loss
            feature_loss = attack.feature_loss(features, poisoned) if feature_layers else None
            total = total if feature_loss is None else total + feature_loss
            optimizer.zero_grad(set_to_none=True)
            if attack_optimizer is not None:
                attack_optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            if attack_optimizer is not None:
                attack_optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "seconds": time.perf_counter() - started,
            }
        )
    bar.close()
    model.cpu().eval()
    if networks is not None:
        networks.cpu().eval()
    return history

"""Device selection shared by every entry point: CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from fire_defense.errors import FireDefenseError

__all__ = ["module_device", "resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    Args:
        device: ``None`` or ``"auto"`` picks ``cuda`` when available, else ``cpu``;
            anything else is parsed by ``torch.device``.

    Raises:
        FireDefenseError: the name is not a device, or CUDA was asked for on a machine without it.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise FireDefenseError(f"{device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FireDefenseError(f"device {device!r} was asked for but CUDA is not available here; use 'cpu' or 'auto'.")
    return resolved


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: its first parameter's (or buffer's) device; the CPU if it has neither."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), torch.empty(0))
    return tensor.device

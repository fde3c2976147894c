"""FIRE: Feature-space Inference-time REpair of backdoored networks.

The core package. It works on any ``torch.nn.Module`` classifier and knows
nothing of BackdoorBench, datasets on disk, or the benchmark: those live in
``fire_adapters`` (the repository's ``adapters/`` folder) and ``benchmarks/``,
which import from here and never the other way round.
"""

from fire_defense.device import resolve_device
from fire_defense.errors import FireDefenseError, NotFittedError, UnknownNameError
from fire_defense.fire import FIRE, MODES, RepairedModel
from fire_defense.layers import candidate_layers, resolve_layers
from fire_defense.registry import Registry, drop_none

__version__ = "0.1.0"

__all__ = [
    "FIRE",
    "MODES",
    "FireDefenseError",
    "NotFittedError",
    "Registry",
    "RepairedModel",
    "UnknownNameError",
    "__version__",
    "candidate_layers",
    "drop_none",
    "resolve_device",
    "resolve_layers",
]

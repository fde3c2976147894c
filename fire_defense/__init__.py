"""FIRE: Feature-space Inference-time REpair of backdoored networks.

The core package. It works on any ``torch.nn.Module`` classifier and knows
nothing of BackdoorBench, datasets on disk, or the benchmark: those live in
``fire_adapters`` (the repository's ``adapters/`` folder) and ``benchmarks/``,
which import from here and never the other way round.
"""

from fire_defense.device import resolve_device
from fire_defense.errors import FireDefenseError, UnknownNameError
from fire_defense.registry import Registry, drop_none

__version__ = "0.1.0"

__all__ = [
    "FireDefenseError",
    "Registry",
    "UnknownNameError",
    "__version__",
    "drop_none",
    "resolve_device",
]

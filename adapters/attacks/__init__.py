"""Poisoning attacks that make backdoored models: one file each, one registry.

Each follows its paper and BackdoorBench's defaults (see each module's docstring for the source
and what differs). Importing this package registers them all.
"""

from fire_adapters.attacks.adap_blend import AdapBlend
from fire_adapters.attacks.adap_patch import AdapPatch
from fire_adapters.attacks.badnet import BadNet
from fire_adapters.attacks.base import ATTACKS, Attack, create_attack, list_attacks, register_attack
from fire_adapters.attacks.blended import Blended
from fire_adapters.attacks.bpp import BppAttack
from fire_adapters.attacks.ctrl import CTRL
from fire_adapters.attacks.fire_aware import FireAware as FireAware  # registers fire-aware
from fire_adapters.attacks.ftrojan import FTrojan
from fire_adapters.attacks.inputaware import InputAware
from fire_adapters.attacks.sig import SIG
from fire_adapters.attacks.wanet import WaNet

__all__ = [
    "ATTACKS",
    "CTRL",
    "SIG",
    "AdapBlend",
    "AdapPatch",
    "Attack",
    "BadNet",
    "Blended",
    "BppAttack",
    "FTrojan",
    "InputAware",
    "WaNet",
    "create_attack",
    "list_attacks",
    "register_attack",
]

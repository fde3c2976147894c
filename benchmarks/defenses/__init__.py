"""Runtime defenses behind one interface (:class:`RuntimeDefense`), and their registry.

Each module registers one defense (or a family sharing one class); importing this package
registers them all. ``create_defense("strip")``, ``list_defenses()``.
"""

from fire_bench.defenses import (  # noqa: F401
    bdmae,
    clipping,
    correction,
    feature_reset,
    februus,
    fire,
    shrinkpad,
    transforms,
    undefended,
)

from fire_bench.defenses import ibd_psc, scaleup, sentinet, strip, teco  # noqa: F401  # isort: skip  (the detectors)
from fire_bench.defenses import fire_stream  # noqa: F401  # isort: skip  (FIRE's streaming estimate, the k-curve)
from fire_bench.defenses.base import (
    DEFENSES,
    Decision,
    RuntimeDefense,
    Threshold,
    Trigger,
    calibrate_threshold,
    create_defense,
    list_defenses,
    register_defense,
)

__all__ = [
    "DEFENSES",
    "Decision",
    "RuntimeDefense",
    "Threshold",
    "Trigger",
    "calibrate_threshold",
    "create_defense",
    "list_defenses",
    "register_defense",
]

"""FIRE as a BackdoorBench defense: the class its scripts run, and the installer that adds it to a checkout.

See ``docs/backdoorbench.md``. :class:`FireDefense` derives from BackdoorBench's ``defense.base.defense`` when
that is importable at the first import of this package (BackdoorBench's root on ``sys.path``, as the installed
``defense/fire.py`` arranges), and from ``object`` otherwise.
"""

from fire_bench.backdoorbench.defense import FireDefense, main
from fire_bench.backdoorbench.install import add_commands, install, uninstall

__all__ = ["FireDefense", "add_commands", "install", "main", "uninstall"]

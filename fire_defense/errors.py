"""The error types this project raises on bad input.

Every one carries a single line that names the problem and the fix, so that a
command-line entry point can print ``str(error)`` and exit instead of showing a
traceback from deep inside torch.
"""

__all__ = ["FireDefenseError", "UnknownNameError"]


class FireDefenseError(Exception):
    """Base class: bad input or a missing resource, explained in one line."""


class UnknownNameError(FireDefenseError, ValueError):
    """A name (model, dataset, defense, ...) that no registry knows."""

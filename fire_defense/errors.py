"""The error types this project raises on bad input, and how command lines report them.

Every one carries a single line that names the problem and the fix, so that a
command-line entry point can print ``str(error)`` and exit instead of showing a
traceback from deep inside torch.
"""

import sys
from collections.abc import Callable

__all__ = ["FireDefenseError", "NotFittedError", "UnknownNameError", "first_line", "run_cli"]


class FireDefenseError(Exception):
    """Base class: bad input or a missing resource, explained in one line."""


class UnknownNameError(FireDefenseError, ValueError):
    """A name (model, dataset, defense, ...) that no registry knows."""


class NotFittedError(FireDefenseError):
    """An estimator was used before it was fitted."""


def run_cli(prog: str, command: Callable[[], object]) -> int:
    """Run a command-line action: 0 on success; a :class:`FireDefenseError` is one line on stderr and status 2."""
    try:
        command()
    except FireDefenseError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

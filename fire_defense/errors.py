"""The error types this project raises on bad input, and how command lines report them.

Every one carries a single line that names the problem and the fix, so that a
command-line entry point can print ``str(error)`` and exit instead of showing a
traceback from deep inside torch.
"""

import re
import sys
from collections.abc import Callable

__all__ = ["FireDefenseError", "NotFittedError", "UnknownNameError", "first_line", "run_cli", "torch_load_reason"]


class FireDefenseError(Exception):
    """Base class: bad input or a missing resource, explained in one line."""


class UnknownNameError(FireDefenseError, ValueError):
    """A name (model, dataset, defense, ...) that no registry knows."""


class NotFittedError(FireDefenseError):
    """An estimator was used before it was fitted."""


def run_cli(prog: str, command: Callable[[], object]) -> int:
    """Run a command-line action and return its exit status, never a traceback for what a user can cause.

    0 on success; a :class:`FireDefenseError` is one line on stderr and status 2; any other ``OSError``
    (a file that cannot be read or written) one line naming it and status 1; Ctrl-C (``KeyboardInterrupt``)
    its message, or ``interrupted``, and status 130.
    """
    try:
        command()
    except FireDefenseError as error:
        print(f"{prog}: error: {first_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        where = " ".join(f"{name}" for name in (error.filename, error.filename2) if name is not None)
        what = error.strerror or first_line(error)
        print(
            f"{prog}: error: {what}{f': {where}' if where else ''}; check that path and its permissions.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as error:
        print(f"{prog}: {first_line(error) if str(error) else 'interrupted'}", file=sys.stderr)
        return 130
    return 0


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


_WEIGHTS_ONLY_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|Check the documentation|$)", re.S)


def torch_load_reason(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line, without torch's advice.

    torch's message suggests re-running with ``weights_only=False`` (or allow-listing the global): wrong
    advice for a file that may be hostile, so only the unpickler's own reason is kept.
    """
    text = str(error)
    match = _WEIGHTS_ONLY_DETAIL.search(text)
    if match:
        detail = re.split(r"\.\s+Please use", " ".join(match.group(1).split()))[0].rstrip(".")
        return detail or type(error).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__

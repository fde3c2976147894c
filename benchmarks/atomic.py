"""Atomic file writes: a result is whole on disk, or absent.

Every file the benchmark keeps (cached cells and latency measurements, the BackdoorBench plugin's
outputs) is written to a temporary name beside its destination and renamed into place, so a
killed run never leaves a half-written file where a finished one is looked for. Every folder a
command writes to is made and test-written (:func:`writable_folder`) before any work starts.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fire_defense import FireDefenseError

__all__ = ["partial_path", "writable_folder", "write_atomically", "write_json_atomically"]


def _unique() -> str:
    """A name part no other writer shares: this process and a random suffix."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def partial_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique to this writer, to write to before renaming onto ``path``."""
    return path.with_name(f".{path.name}.{_unique()}.partial")


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary)`` for a fresh name beside ``path``, then rename it onto ``path``; returns ``path``.

    The temporary name is unique (process and random suffix), so concurrent writers never share it;
    on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_json_atomically(path: str | Path, value: Any) -> Path:
    """``value`` as indented JSON at ``path``, written atomically (:func:`write_atomically`)."""
    text = json.dumps(value, indent=1)
    return write_atomically(path, lambda partial: partial.write_text(text))


def writable_folder(path: str | Path, what: str) -> Path:
    """``path`` as a folder this process can write to: made if missing, and a file written in it and removed.

    Args:
        what: What the folder is for, named in the error (``'--out'``, ``'the cache folder'``).

    Raises:
        FireDefenseError: ``path`` (or a folder above it) is a file, or the folder cannot be made or written.
    """
    path = Path(path)
    probe = path / f".write-test.{_unique()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise FireDefenseError(
            f"{what} {path} is not a folder (it, or a folder above it, is a file); give a folder path."
        ) from None
    except OSError as error:
        raise FireDefenseError(
            f"cannot write to {what} {path} ({error.strerror or error}); give a folder you can write to."
        ) from None
    return path

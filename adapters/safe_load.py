"""Loading untrusted files without executing them.

A BackdoorBench ``attack_result.pt`` and a CIFAR batch file are pickles. A
pickle can name any Python callable and have it called while loading, so a
plain ``torch.load`` (``weights_only=False``) or ``pickle.load`` of a file a user
hands us would run whatever code its author chose. Both loaders here resolve
only an allow-list of globals: what ``torch.load(weights_only=True)`` accepts
(tensors, containers, plain values) plus exactly the numpy names a record or a
CIFAR batch refers to. Anything else is refused before it is called.
"""

from __future__ import annotations

import codecs
import pickle
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from fire_defense import FireDefenseError
from fire_defense.errors import first_line, torch_load_reason

try:  # numpy >= 2 keeps the implementation in numpy._core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

__all__ = ["ALLOWED_NUMPY_GLOBALS", "UnsafeFileError", "safe_torch_load", "safe_unpickle"]


class UnsafeFileError(FireDefenseError):
    """A file refers to a Python global outside the allow-list; it was not loaded."""


# Dotted names as they appear inside the pickle (numpy 2 writes numpy._core.*,
# numpy 1.x wrote numpy.core.*), with the object each one may resolve to.
ALLOWED_NUMPY_GLOBALS: dict[str, Any] = {
    "numpy._core.multiarray._reconstruct": _multiarray._reconstruct,
    "numpy.core.multiarray._reconstruct": _multiarray._reconstruct,
    "numpy._core.multiarray.scalar": _multiarray.scalar,
    "numpy.core.multiarray.scalar": _multiarray.scalar,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
}

# Loading an array sets the state of its dtype object, so torch must also be allowed to build the dtype classes
# (numpy.dtypes.Int64DType, ...) of plain numeric arrays. Object arrays stay refused.
_NUMERIC_DTYPE_CLASSES = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]

_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNSUPPORTED_CLASS = re.compile(r"but got <class '([\w.]+)'>")


def _refusal(path: Path, name: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} refers to {name!r}, which is not on the allow-list of what a record may contain "
        "(tensors, numpy arrays, plain values) and could run code when loaded; it was not loaded. "
        "Re-save it from trusted code with only tensors, numpy arrays and plain Python values."
    )


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with the numpy globals of :data:`ALLOWED_NUMPY_GLOBALS` allowed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeFileError: the file needs any other global; nothing in it was executed.
        FireDefenseError: the file is not a readable torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    allowed = [(obj, name) for name, obj in ALLOWED_NUMPY_GLOBALS.items()] + _NUMERIC_DTYPE_CLASSES
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        match = _UNSUPPORTED_GLOBAL.search(str(error)) or _UNSUPPORTED_CLASS.search(str(error))
        if match:
            raise _refusal(path, match.group(1)) from None
        raise FireDefenseError(
            f"{path} is not a torch file that loads safely ({torch_load_reason(error)}); it was not loaded: "
            "re-copy it, or re-save it from trusted code with only tensors, numpy arrays and plain values."
        ) from None
    except Exception as error:  # noqa: BLE001 - a corrupt or hostile file raises many types (KeyError, ...)
        raise FireDefenseError(
            f"{path} is not a readable torch file ({torch_load_reason(error)}); it may be truncated or corrupt: "
            "re-copy it."
        ) from None


class _AllowListUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the allow-listed numpy globals (and ``_codecs.encode``)."""

    def __init__(self, file: IO[bytes], path: Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        dotted = f"{module}.{name}"
        if dotted in ALLOWED_NUMPY_GLOBALS:
            return ALLOWED_NUMPY_GLOBALS[dotted]
        if dotted == "_codecs.encode":  # how protocol-2 pickles store bytes; it only encodes text
            return codecs.encode
        raise _refusal(self._path, dotted)


def safe_unpickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Read a plain pickle file (e.g. a CIFAR batch) that may only hold plain values and numpy arrays.

    Args:
        path: The file.
        encoding: How to decode Python 2 strings (CIFAR's files were written by Python 2).

    Raises:
        UnsafeFileError: the file needs any other global; nothing in it was executed.
        FireDefenseError: the file is not a readable pickle.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return _AllowListUnpickler(handle, path, encoding=encoding).load()
        except UnsafeFileError:
            raise
        except Exception as error:  # noqa: BLE001 - a corrupt pickle raises many different types
            raise FireDefenseError(f"{path} is not a readable pickle ({first_line(error)}); re-copy it.") from None

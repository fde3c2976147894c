"""Checks of user-given settings, shared by every layer: whole numbers and finite numbers, bools refused.

Python's ``bool`` is an ``int``, so ``epochs=True`` would pass a plain ``isinstance`` test; numpy's
integer and floating scalars count as the numbers they are (:mod:`numbers` knows them).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

__all__ = ["is_finite_number", "is_integer", "is_number"]


def is_integer(value: Any) -> bool:
    """A whole number (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool; NaN and infinities included."""
    return isinstance(value, Real) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """A real number (Python or numpy), not a bool, neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)

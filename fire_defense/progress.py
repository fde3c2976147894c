"""Progress bars (tqdm) that a whole process can turn off.

A benchmark worker sets ``FIRE_DEFENSE_PROGRESS=0`` so that the only bar on the screen is its
runner's; tqdm's own ``TQDM_DISABLE`` cannot do that, since tqdm reads it once at import and an
explicit ``disable=`` overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["ENV_VAR", "progress_bar"]

ENV_VAR = "FIRE_DEFENSE_PROGRESS"


def progress_bar(
    iterable: Iterable | None = None, *, min_total: int = 0, disable: bool = False, **options: Any
) -> tqdm:
    """A tqdm bar; off where ``disable`` is set, ``FIRE_DEFENSE_PROGRESS=0``, or with fewer than ``min_total`` steps."""
    total = options.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    off = disable or os.environ.get(ENV_VAR) == "0" or (total is not None and total < min_total)
    return tqdm(iterable, disable=off, **options)

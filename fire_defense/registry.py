"""One small registry type for every kind of named thing (models, datasets, defenses, attacks).

Modelled on timm's model registry: entries are stored under a unique name by a
decorator, looked up with ``get`` (an unknown name raises and lists the closest
valid names), and listed sorted, optionally filtered by a shell-style pattern.
:func:`keyword_parameters` reads the hyperparameters of a registered class from its constructors.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from fire_defense.errors import UnknownNameError

__all__ = ["Registry", "drop_none", "keyword_defaults", "keyword_parameters"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry mapping for one kind of thing.

    Args:
        kind: What the entries are ("model", "dataset", ...); used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Store ``entry`` under ``name``; a name may be registered only once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator form of :meth:`add`; the name defaults to the entry's ``__name__``."""

        def decorator(entry: T) -> T:
            return self.add(name or entry.__name__, entry)  # type: ignore[attr-defined]

        return decorator

    def get(self, name: str) -> T:
        """The entry called ``name``.

        Raises:
            UnknownNameError: no such entry; the message lists the nearest valid names.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        """One line saying that ``name`` is unknown and what is known instead."""
        close = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}."

    def names(self, pattern: str = "*") -> list[str]:
        """The registered names matching a shell-style ``pattern``, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def drop_none(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments that were actually set, so unset CLI options never override an entry's defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def keyword_defaults(cls: type) -> dict[str, Any]:
    """Each keyword-only argument of ``cls``'s constructors and its default, a subclass's before its bases', each once.

    Registered classes take their hyperparameters as keyword-only arguments stored under the same
    names (scikit-learn's convention), so these names rebuild an instance.
    """
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if parameter.kind is parameter.KEYWORD_ONLY:
                    defaults.setdefault(parameter.name, parameter.default)
    return defaults


def keyword_parameters(cls: type) -> list[str]:
    """The names of :func:`keyword_defaults`, in its order."""
    return list(keyword_defaults(cls))

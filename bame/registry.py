"""One registry shape for methods, models and data sets.

Each kind has a :class:`Registry` that knows the package holding its implementations. The first look-up
imports every public module of that package, whose ``register`` calls fill the registry; so adding a
method, a model or a data set is one new module, and the command line lists it and the parametrized
tests cover it without any other edit. Listings follow a natural order where there is one (methods: the
paper's tables; data sets: image size), else registration order.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from bame.errors import BameError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object and its one-line description."""

    name: str
    value: T
    description: str


class Registry(Generic[T]):
    """Named objects of one kind, discovered from the modules of one package.

    Args:
        kind: what the entries are, for messages ("method", "model", "dataset").
        package: the package whose modules register entries when imported.
        error: the error class for an unknown name.
        normalize: how a user's name is turned into a registered one (e.g. case-insensitive).
        sort_key: the listing order, from an entry's object (stable: registration order breaks ties); None
            lists in registration order.
        unknown: the message for an unknown name, with ``{kind}``, ``{name}`` and ``{names}``.
    """

    def __init__(self, kind: str, package: str, error: type[BameError] = ConfigError,
                 normalize: Callable[[str], str] = str, sort_key: Callable[[T], Any] | None = None,
                 unknown: str = "unknown {kind} {name!r}; available: {names}") -> None:
        self.kind, self.package, self.error, self.normalize = kind, package, error, normalize
        self.sort_key, self.unknown = sort_key, unknown
        self._entries: dict[str, Entry[T]] = {}
        self._discovered = False

    def register(self, name: str, value: T, description: str) -> T:
        """Add ``value`` under ``name``; a name registered twice is a programming error."""
        if not name:
            raise TypeError(f"a {self.kind} needs a name")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, value, description)
        return value

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> T:
        """The object registered as ``name`` (after :attr:`normalize`); a one-line error lists the others."""
        self._discover()
        key = self.normalize(str(name))
        if key not in self._entries:
            raise self.error(self.unknown.format(kind=self.kind, name=name, names=", ".join(self.names())))
        return self._entries[key].value

    def names(self) -> list[str]:
        """Every registered name, in listing order."""
        self._discover()
        names = list(self._entries)
        if self.sort_key is not None:
            names.sort(key=lambda name: self.sort_key(self._entries[name].value))
        return names

    def available(self) -> dict[str, str]:
        """``{name: description}`` of every entry, in listing order."""
        return {name: self._entries[name].description for name in self.names()}

    def values(self) -> dict[str, T]:
        """``{name: object}`` of every entry, in listing order."""
        return {name: self._entries[name].value for name in self.names()}

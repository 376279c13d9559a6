"""The registry of sparse-training methods.

Adding a method is one new module in this package whose class (a :class:`bame.contract.Method`) is
decorated with :func:`register`; the registry imports every module here on first use, so the command line
lists the method and the parametrized tests cover it.
"""

from __future__ import annotations

from bame.contract import Method
from bame.registry import Registry

__all__ = ["REGISTRY", "available", "get", "register"]

REGISTRY: Registry[type[Method]] = Registry("method", __name__, sort_key=lambda cls: cls.order)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    return REGISTRY.register(cls.name, cls, cls.description)


def available() -> dict[str, str]:
    """Every registered method's name and one-line description, in the paper's table order."""
    return REGISTRY.available()


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    return REGISTRY.get(name)

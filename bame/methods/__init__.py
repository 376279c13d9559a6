"""The registry of sparse-training methods.

Adding a method is one new file in this package whose class is decorated with :func:`register`;
discovery imports every module here, so the CLI lists it and the parametrized tests cover it.
"""

from __future__ import annotations

import importlib
import pkgutil

from bame.errors import ConfigError
from bame.methods.base import Charge, Method, NoOptions

__all__ = ["Charge", "Method", "NoOptions", "available", "get", "register"]

_REGISTRY: dict[str, type[Method]] = {}
_ORDER = ("dense", "static", "asp", "sr_ste", "rigl_nm", "lma", "bame", "bame_bi", "bi_mask", "lbc", "maxq")
_discovered = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True


def available() -> dict[str, str]:
    """Every registered method's name and one-line description, in the paper's table order."""
    _discover()
    names = sorted(_REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
    return {name: _REGISTRY[name].description for name in names}


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]

"""The model registry: factories registered by name, and :func:`create`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from bame.errors import ConfigError
from bame.models._common import check_int, check_positive
from bame.registry import Registry

__all__ = ["REGISTRY", "available", "create", "register"]

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

# The arguments every factory receives from create(); anything else is a model-specific option.
_COMMON = ("num_classes", "in_channels", "image_size", "width")


REGISTRY: Registry[Callable[..., nn.Module]] = Registry(
    "model", "bame.models", unknown="unknown {kind} {name!r}; available models: {names}")


def register(name: str, description: str) -> Callable[[Factory], Factory]:
    """Register a model factory under ``name``.

    The factory is called with the keyword arguments ``num_classes``, ``in_channels``, ``image_size`` and
    ``width``, plus any model-specific options the user passed to :func:`create`.

    Args:
        name: The name users pass to :func:`create`.
        description: One line shown by :func:`available` (and the command line's model list).

    Returns:
        A decorator that records the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already taken (a programming error, not a user error).
    """

    def decorator(factory: Factory) -> Factory:
        return REGISTRY.register(name, factory, description)

    return decorator


def available() -> dict[str, str]:
    """Return the registered models as ``{name: one-line description}``, in registration order."""
    return REGISTRY.available()


def create(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a freshly initialised model (pretrained weights are never loaded).

    Args:
        name: A name from :func:`available`.
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        image_size: Side of the (square) input images. ImageNet models work at any size their strides
            allow, but pass 224 to describe ImageNet inputs: it sets ``bame_input_shape``.
        width: Channel multiplier (1.0 is the published architecture).
        **kwargs: Model-specific options, e.g. ``shortcut="B"`` for the CIFAR ResNets or ``depth`` for
            ``mlp``.

    Returns:
        The model, with ``bame_dense_layers`` and ``bame_input_shape == (in_channels, image_size,
        image_size)`` set.

    Raises:
        ConfigError: For an unknown name, an unknown option or an invalid value.
    """
    factory = REGISTRY.get(name)
    check_int("num_classes", num_classes)
    check_int("in_channels", in_channels)
    check_int("image_size", image_size)
    width = check_positive("width", width)
    _check_options(name, factory, kwargs)
    model = factory(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width, **kwargs
    )
    if not isinstance(getattr(model, "bame_dense_layers", None), tuple):
        raise TypeError(f"model factory {name!r} did not set bame_dense_layers")  # a bug, not a user error
    model.bame_input_shape = (in_channels, image_size, image_size)
    return model


def _check_options(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    """Raise a ConfigError naming the valid options if ``options`` has one the factory does not take."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return  # the factory forwards extra options to a third-party constructor, which checks them
    accepted = [p for p in parameters if p not in _COMMON]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(f"model {name!r} has no option {unknown[0]!r}; its options: {valid}")

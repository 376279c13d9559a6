"""Helpers shared by the architectures: argument checks, channel rounding and weight init."""

from __future__ import annotations

import math

from torch import nn

from bame.errors import ConfigError


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise a :class:`ConfigError`.

    Args:
        name: The option's name, for the message.
        value: The value to check.
        minimum: The smallest accepted value.

    Returns:
        ``value`` unchanged.

    Raises:
        ConfigError: If ``value`` is not an ``int`` (``bool`` is refused too) or is below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number > 0, else raise a :class:`ConfigError`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def scaled(channels: int, width: float, name: str = "width") -> int:
    """Scale a channel count by ``width``, rounding to the nearest integer.

    Args:
        channels: The channel count at ``width=1``.
        width: The width multiplier.
        name: What is being scaled, for the message.

    Returns:
        ``round(channels * width)``.

    Raises:
        ConfigError: If the result would be zero channels.
    """
    result = int(round(channels * width))
    if result < 1:
        raise ConfigError(f"{name}={width} leaves {channels} channels with none; use a larger width")
    return result


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never less than ``divisor``.

    This is the rule of the MobileNet reference code (Sandler et al. 2018): round to the nearest multiple,
    but step up once more if rounding down removed more than 10 % of the channels.

    Args:
        value: The unrounded channel count.
        divisor: The multiple to round to.

    Returns:
        The rounded channel count.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def init_conv_bn(model: nn.Module) -> None:
    """Initialise convolutions and batch norms as the ResNet reference code does.

    Convolutions get He et al. (2015) normal init with fan-out (the rule of the authors' Torch code,
    fb.resnet.torch, kept by torchvision); batch norms start as the identity (scale 1, shift 0).
    Linear layers keep PyTorch's default init.

    Args:
        model: The model whose modules are initialised in place.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

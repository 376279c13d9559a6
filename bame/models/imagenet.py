"""ImageNet models from torchvision and timm, always randomly initialised.

* ResNet-18 and ResNet-50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), as
  built by ``torchvision.models``.
* DeiT-Small (Touvron et al., "Training data-efficient image transformers", ICML 2021), as built by
  ``timm``'s ``deit_small_patch16_224``.

torchvision and timm are optional (``pip install 'bame[vision]'``) and slow to import, so they are
imported when a factory here is called, never when :mod:`bame.models` is imported.

N:M papers keep the first layer and the classifier of these models dense, so ``bame_dense_layers`` names
both: ``conv1`` and ``fc`` for the ResNets, ``patch_embed.proj`` and ``head`` for DeiT.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import nn

from bame.errors import ConfigError
from bame.models.registry import register


def _require(module: str, model: str) -> ModuleType:
    """Import an optional dependency, or explain how to install it."""
    package = module.split(".")[0]
    try:
        # Import the top-level package first: a submodule already in sys.modules would otherwise be
        # returned even when the package itself is unavailable.
        importlib.import_module(package)
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{model} needs {package}: pip install 'bame[vision]'") from error


def _no_width(model: str, width: float) -> None:
    if width != 1.0:
        raise ConfigError(f"{model} has only the published width; use width=1, got {width}")


def _torchvision_resnet(
    name: str, num_classes: int, in_channels: int, width: float, options: dict[str, Any]
) -> nn.Module:
    _no_width(name, width)
    models = _require("torchvision.models", name)
    try:
        model: nn.Module = getattr(models, name)(weights=None, num_classes=num_classes, **options)
    except TypeError as error:
        raise ConfigError(f"{name}: invalid option among {sorted(options)} ({error})") from error
    if in_channels != 3:
        # torchvision hard-codes an RGB stem; swap it for one of the same shape otherwise, with
        # torchvision's init for it.
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.bame_dense_layers = ("conv1", "fc")
    return model


@register("resnet18", "ImageNet ResNet-18 (He et al. 2016) from torchvision, 11.7M params at 1000 classes")
def resnet18(
    *, num_classes: int, in_channels: int, image_size: int, width: float, **options: Any
) -> nn.Module:
    """torchvision's ResNet-18, untrained; extra options go to its constructor (e.g. zero_init_residual)."""
    del image_size  # adaptive average pooling makes any input size work
    return _torchvision_resnet("resnet18", num_classes, in_channels, width, options)


@register("resnet50", "ImageNet ResNet-50 (He et al. 2016) from torchvision, 25.6M params at 1000 classes")
def resnet50(
    *, num_classes: int, in_channels: int, image_size: int, width: float, **options: Any
) -> nn.Module:
    """torchvision's ResNet-50, untrained; extra options go to its constructor (e.g. zero_init_residual)."""
    del image_size
    return _torchvision_resnet("resnet50", num_classes, in_channels, width, options)


@register("deit_small", "DeiT-Small/16 (Touvron et al. 2021) from timm, 22.1M params at 1000 classes")
def deit_small(
    *, num_classes: int, in_channels: int, image_size: int, width: float, **options: Any
) -> nn.Module:
    """timm's ``deit_small_patch16_224``, untrained, built for ``image_size`` (a multiple of 16).

    Extra options go to timm's ``VisionTransformer`` (e.g. ``drop_path_rate=0.1``, DeiT's recipe).
    """
    _no_width("deit_small", width)
    if image_size % 16:
        raise ConfigError(
            f"deit_small has 16x16 patches: image_size must be a multiple of 16, got {image_size}"
        )
    timm = _require("timm", "deit_small")
    try:
        model: nn.Module = timm.create_model(
            "deit_small_patch16_224",
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_channels,
            img_size=image_size,
            **options,
        )
    except TypeError as error:
        raise ConfigError(f"deit_small: invalid option among {sorted(options)} ({error})") from error
    model.bame_dense_layers = ("patch_embed.proj", "head")
    return model

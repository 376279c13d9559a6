"""The model zoo: every architecture the experiments train, behind one :func:`create`.

Each architecture is a factory function registered under a short name::

    @register("resnet20", "CIFAR ResNet-20 (He et al. 2016), 0.27M params")
    def resnet20(*, num_classes: int, in_channels: int, image_size: int, width: float,
                 shortcut: str = "A") -> nn.Module: ...

so adding a model is that one function, in a module of this package (the registry finds every module;
the imports at the end of this file only fix the listing order of the built-in ones). :func:`create`
checks the common arguments, rejects options the factory does not take (model options reach it from the
config's ``model_options``, ``--model-option KEY=VALUE`` and recipes), builds the model and stamps
``bame_input_shape`` on it. Every model also carries
``bame_dense_layers``: the names (as in ``named_modules()``) of the layers the paper's policy keeps dense.

Importing this package imports only torch: torchvision and timm are imported by the factories that need
them, when they are called.
"""

from bame.models.registry import REGISTRY, available, create, register

__all__ = ["REGISTRY", "available", "create", "register"]

# The built-in architectures in their listing order (available() lists in registration order; the registry
# imports any other module of this package on first use).
from bame.models import cifar_resnet, mobilenetv2, small, vit, imagenet  # noqa: E402, F401, I001

"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2).

The network is a 3x3 stem convolution, three stages of ``n`` basic blocks with 16, 32 and 64 channels
(times ``width``) on feature maps of size 32, 16 and 8, global average pooling and a linear classifier:
``6n + 2`` weighted layers, so n = 3, 5, 9 give ResNet-20, -32 and -56.

Where a block changes shape (the first block of stages 2 and 3), the paper's option A shortcut is
parameter-free: subsample by taking every other pixel and zero-pad the new channels. This is what the
CIFAR reference codes use and it is why ResNet-20 has 0.27M parameters. Option B (1x1 convolution + batch
norm on those shortcuts) is available as ``shortcut="B"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bame.errors import ConfigError
from bame.models._common import init_conv_bn, scaled
from bame.models.registry import register

SHORTCUTS = ("A", "B")


class ShortcutA(nn.Module):
    """The option-A shortcut: stride-``s`` subsampling, then zero channels padded on both sides.

    It has no parameters, so it adds nothing a sparsifier could prune and nothing to the count.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("option A can only add channels")
        self.stride = stride
        # Pad half the new channels in front and half behind, as the reference code does; an odd count
        # (possible at fractional widths) puts the extra one behind.
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            # ceil(size / stride) pixels, the same output size as the strided 3x3 conv with padding 1.
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_front or self.pad_back:
            x = F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, figure 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ``6n + 2``-layer CIFAR ResNet.

    Args:
        depth: Number of weighted layers, ``6n + 2`` (20, 32, 44, 56, 110 ...).
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        width: Channel multiplier; ``width=2`` gives the 32-64-128 ResNet-32 that N:M papers (and Bi-Mask's
            code) train on CIFAR.
        shortcut: ``"A"`` (parameter-free) or ``"B"`` (1x1 conv + BN) for the shortcuts that change shape.

    Attributes:
        bame_dense_layers: ``("fc",)``: only the classifier is kept dense. The stem has ``in_channels``
            inputs, which no N:M pattern divides, so it stays dense without being listed.
    """

    def __init__(
        self, depth: int, num_classes: int, in_channels: int = 3, width: float = 1.0, shortcut: str = "A"
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"a CIFAR ResNet has 6n+2 layers (20, 32, 56 ...), got depth {depth}")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = (depth - 2) // 6
        channels = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.layer1 = self._stage(channels[0], channels[0], blocks, 1, shortcut)
        self.layer2 = self._stage(channels[0], channels[1], blocks, 2, shortcut)
        self.layer3 = self._stage(channels[1], channels[2], blocks, 2, shortcut)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[2], num_classes)
        init_conv_bn(self)
        self.bame_dense_layers: tuple[str, ...] = ("fc",)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride, shortcut)]
        layers += [BasicBlock(out_channels, out_channels, 1, shortcut) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(
    depth: int, num_classes: int, in_channels: int, image_size: int, width: float, shortcut: str
) -> CifarResNet:
    # Global average pooling makes any input size work; image_size only matters for bame_input_shape.
    del image_size
    return CifarResNet(depth, num_classes, in_channels=in_channels, width=width, shortcut=shortcut)


@register("resnet20", "CIFAR ResNet-20 (He et al. 2016): 3x3 basic blocks, 16-32-64 x width, 0.27M params")
def resnet20(
    *, num_classes: int, in_channels: int, image_size: int, width: float, shortcut: str = "A"
) -> nn.Module:
    """ResNet-20 for CIFAR (n = 3). See :class:`CifarResNet`."""
    return _build(20, num_classes, in_channels, image_size, width, shortcut)


@register("resnet32", "CIFAR ResNet-32 (He et al. 2016): 0.46M params; width=2 is the 32-64-128 N:M baseline")
def resnet32(
    *, num_classes: int, in_channels: int, image_size: int, width: float, shortcut: str = "A"
) -> nn.Module:
    """ResNet-32 for CIFAR (n = 5). See :class:`CifarResNet`."""
    return _build(32, num_classes, in_channels, image_size, width, shortcut)


@register("resnet56", "CIFAR ResNet-56 (He et al. 2016): 3x3 basic blocks, 16-32-64 x width, 0.85M params")
def resnet56(
    *, num_classes: int, in_channels: int, image_size: int, width: float, shortcut: str = "A"
) -> nn.Module:
    """ResNet-56 for CIFAR (n = 9). See :class:`CifarResNet`."""
    return _build(56, num_classes, in_channels, image_size, width, shortcut)

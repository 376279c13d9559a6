"""MobileNetV2 for 32x32 images (Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018), and the full-convolution variant that N:M baselines trained under that name.

Each inverted-residual block expands its input ``t`` times with a 1x1 convolution, filters it with a 3x3
depthwise convolution, and projects it back with a linear 1x1 convolution (table 2 of the paper). The CIFAR
adaptation keeps the paper's (t, c, n, s) table but uses a stride-1 stem and a stride-1 second stage, so a
32x32 input reaches the last stage at 4x4 instead of 1x1.

``mobilenetv2_fullconv`` reproduces the CIFAR MobileNetV2 of Bi-Mask's code (Zhang et al., "Bi-directional
Masks for Efficient N:M Sparse Training", ICML 2023), which the N:M papers report as "MobileNetV2": its
3x3 convolutions are full (groups=1), not depthwise, which gives it 19 times the parameters (42.8M instead of
2.2M) and 20 times the multiply-adds (1.8G instead of 88M per 32x32 image). Use it only to reproduce those
baselines.
"""

from __future__ import annotations

import torch
from torch import nn

from bame.models._common import init_conv_bn, make_divisible
from bame.models.registry import register

# (expansion t, output channels c, repeats n, stride s) of the paper's table 2, with the second stage's
# stride set to 1 for 32x32 inputs.
CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> filter (3x3, ``conv2``) -> project (1x1, linear), with an optional residual.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        expansion: The expansion factor ``t``.
        stride: Stride of the 3x3 convolution.
        full_conv: ``False`` for the paper's block (depthwise 3x3, ReLU6, identity residual only when the
            shape is unchanged, no expansion conv when t = 1). ``True`` for Bi-Mask's block (full 3x3,
            ReLU, an expansion conv even when t = 1, and every stride-1 block residual, through a
            1x1 conv + BN when the channel count changes).
    """

    def __init__(
        self, in_channels: int, out_channels: int, expansion: int, stride: int, full_conv: bool
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.conv1: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        if expansion != 1 or full_conv:
            self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(
            hidden, hidden, 3, stride=stride, padding=1, groups=1 if full_conv else hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        # ReLU6 is the paper's choice (robust under low-precision inference); Bi-Mask's code uses ReLU.
        self.act = nn.ReLU(inplace=True) if full_conv else nn.ReLU6(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if full_conv:
            self.residual = stride == 1
            if self.residual and in_channels != out_channels:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
                )
        else:
            self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.conv1 is not None and self.bn1 is not None:
            out = self.act(self.bn1(self.conv1(out)))
        out = self.act(self.bn2(self.conv2(out)))
        # No activation after the projection: the paper's "linear bottleneck".
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for small images.

    Args:
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        width: Width multiplier; channel counts are rounded to multiples of 8 and, as in the paper, the
            last 1x1 convolution keeps its 1280 channels for widths below 1.
        full_conv: Build Bi-Mask's full-convolution variant instead (see :class:`InvertedResidual`).

    Attributes:
        bame_dense_layers: ``("classifier",)``.
    """

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: float = 1.0, full_conv: bool = False
    ) -> None:
        super().__init__()
        stem = make_divisible(32 * width, 8)
        last = make_divisible(1280 * max(1.0, width), 8)
        act = nn.ReLU if full_conv else nn.ReLU6
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = act(inplace=True)
        blocks: list[nn.Module] = []
        channels = stem
        for expansion, out, repeats, stride in CIFAR_CONFIG:
            out = make_divisible(out * width, 8)
            for i in range(repeats):
                blocks.append(InvertedResidual(channels, out, expansion, stride if i == 0 else 1, full_conv))
                channels = out
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(channels, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.act2 = act(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_conv_bn(self)
        # The reference implementations start the classifier small (std 0.01) with zero bias.
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)
        self.bame_dense_layers: tuple[str, ...] = ("classifier",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.act2(self.bn2(self.conv2(x)))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register(
    "mobilenetv2", "MobileNetV2 (Sandler et al. 2018) for 32x32 inputs: depthwise 3x3 convs, 2.2M params"
)
def mobilenetv2(*, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """The paper's MobileNetV2 with CIFAR strides. See :class:`MobileNetV2`."""
    del image_size  # global average pooling: any size works
    return MobileNetV2(num_classes, in_channels=in_channels, width=width, full_conv=False)


@register(
    "mobilenetv2_fullconv",
    "NOT the real MobileNetV2: Bi-Mask's CIFAR baseline, full (non-depthwise) 3x3 convs, 42.8M params (19x)",
)
def mobilenetv2_fullconv(*, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """Bi-Mask's full-convolution "MobileNetV2", to reproduce N:M baselines. See :class:`MobileNetV2`."""
    del image_size
    return MobileNetV2(num_classes, in_channels=in_channels, width=width, full_conv=True)

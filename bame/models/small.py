"""Small models for quick experiments and tests: a LeNet-style CNN and a transformer-style MLP.

``smallcnn`` follows the LeNet-5 pattern (LeCun et al., "Gradient-Based Learning Applied to Document
Recognition", Proc. IEEE 1998): convolutions and pooling followed by fully connected layers, with batch norm
(Ioffe & Szegedy 2015) and global average pooling so the same network fits 8x8 digits and 28x28
Fashion-MNIST. Its channel counts are multiples of 16, so every layer but the stem and the head admits N:M
patterns up to 1:16.

``mlp`` is the feed-forward half of a transformer (Vaswani et al., "Attention Is All You Need", NeurIPS
2017) in the pre-norm residual form of ViT (Dosovitskiy et al., ICLR 2021), applied to image tokens: it
exercises sparse ``Linear`` layers with nothing else in the way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bame.errors import ConfigError
from bame.models._common import check_int, check_positive, init_conv_bn, make_divisible, scaled
from bame.models.registry import register


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, global average pool, two linear layers.

    Args:
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        width: Channel multiplier; counts are rounded to multiples of 16 (32-64-128 and a 128-unit hidden
            layer at width 1).

    Attributes:
        bame_dense_layers: ``("head",)``.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, hidden = (make_divisible(c * width, 16) for c in (32, 64, 128, 128))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc1 = nn.Linear(c3, hidden)
        self.head = nn.Linear(hidden, num_classes)
        init_conv_bn(self)
        self.bame_dense_layers: tuple[str, ...] = ("head",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = x.mean(dim=(2, 3))
        return self.head(F.relu(self.fc1(x)))


class MLPBlock(nn.Module):
    """Pre-norm residual feed-forward block: ``x + fc2(GELU(fc1(LayerNorm(x))))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ImageMLP(nn.Module):
    """Tokens (the whole image, or patches) -> linear embedding -> MLP blocks -> LayerNorm -> head.

    With patches, each token goes through the blocks on its own (there is no token mixing); a learned
    position embedding tells them apart and the tokens are averaged before the head.

    Args:
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        image_size: Side of the square input images.
        dim: Token width.
        depth: Number of MLP blocks.
        mlp_ratio: Hidden width of each block, as a multiple of ``dim`` (rounded to an integer).
        patch_size: Side of the square patches, or ``None`` to make the whole image one token.

    Attributes:
        bame_dense_layers: ``("head",)``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        dim: int = 256,
        depth: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = image_size if patch_size is None else patch_size
        if image_size % self.patch_size:
            raise ConfigError(f"patch_size {self.patch_size} does not divide image_size {image_size}")
        tokens = (image_size // self.patch_size) ** 2
        self.embed = nn.Linear(in_channels * self.patch_size**2, dim)
        # One token needs no position; with several, zeros are a neutral start (they are learned).
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim)) if tokens > 1 else None
        hidden = scaled(dim, mlp_ratio, "mlp_ratio")
        self.blocks = nn.Sequential(*(MLPBlock(dim, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.bame_dense_layers: tuple[str, ...] = ("head",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        # (B, C, H, W) -> (B, tokens, C*p*p), each token one p x p patch.
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = self.embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@register(
    "smallcnn", "LeNet-style CNN (LeCun et al. 1998) for 8x8 digits and 28x28 Fashion-MNIST, 0.11M params"
)
def smallcnn(*, num_classes: int, in_channels: int, image_size: int, width: float) -> nn.Module:
    """A small CNN that trains in seconds on CPU. See :class:`SmallCNN`."""
    if image_size < 2:
        raise ConfigError(f"smallcnn max-pools by 2, so it needs image_size >= 2, got {image_size}")
    return SmallCNN(num_classes, in_channels=in_channels, width=width)


@register("mlp", "transformer-style MLP on image tokens: pre-norm Linear-GELU-Linear blocks, dim 256 depth 4")
def mlp(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float,
    dim: int = 256,
    depth: int = 4,
    mlp_ratio: float = 4.0,
    patch_size: int | None = None,
) -> nn.Module:
    """A stack of transformer MLP blocks. See :class:`ImageMLP`; ``width`` scales ``dim``."""
    check_int("dim", dim)
    check_int("depth", depth)
    check_positive("mlp_ratio", mlp_ratio)
    if patch_size is not None:
        check_int("patch_size", patch_size)
    return ImageMLP(
        num_classes,
        in_channels,
        image_size,
        dim=scaled(dim, width),
        depth=depth,
        mlp_ratio=mlp_ratio,
        patch_size=patch_size,
    )

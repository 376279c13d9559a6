"""A small Vision Transformer for small images (Dosovitskiy et al., "An Image is Worth 16x16 Words",
ICLR 2021), at the size of DeiT-Tiny (Touvron et al., "Training data-efficient image transformers", ICML
2021): width 192, 3 heads, MLP ratio 4, with 6 blocks instead of 12 and small patches so a 32x32 image
still gives 64 tokens.

Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.i.attn.qkv``,
``blocks.i.mlp.fc1`` ...), so a layer policy written for DeiT reads the same here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bame.errors import ConfigError
from bame.models._common import check_int, check_positive, scaled
from bame.models.registry import register


class PatchEmbed(nn.Module):
    """Cut the image into ``patch x patch`` patches and embed each linearly, as one strided convolution."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, tokens, dim)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The fused kernel picks flash / memory-efficient attention where available.
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """The transformer feed-forward layer: ``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with a class token and a learned position embedding; the head reads the class token.

    Args:
        num_classes: Size of the classifier's output.
        in_channels: Channels of the input images.
        image_size: Side of the square input images; must be a multiple of ``patch_size``.
        patch_size: Side of the square patches.
        dim: Token width; must be a multiple of ``heads``.
        depth: Number of transformer blocks.
        heads: Number of attention heads.
        mlp_ratio: Hidden width of the MLPs, as a multiple of ``dim``.

    Attributes:
        bame_dense_layers: ``("head",)``. The patch embedding has ``in_channels`` inputs per patch
            position, which no N:M pattern divides, so it stays dense without being listed.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        patch_size: int,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"patch_size {patch_size} does not divide image_size {image_size}")
        if dim % heads:
            raise ConfigError(f"token width {dim} is not a multiple of heads={heads}; change width or heads")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        hidden = scaled(dim, mlp_ratio, "mlp_ratio")
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()
        self.bame_dense_layers: tuple[str, ...] = ("head",)

    def _init_weights(self) -> None:
        # ViT / DeiT init: truncated normal (std 0.02) for embeddings and linear layers, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register(
    "vit_tiny", "small ViT (Dosovitskiy et al. 2021) for small images: dim 192, depth 6, 3 heads, 2.7M params"
)
def vit_tiny(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    width: float,
    patch_size: int | None = None,
    depth: int = 6,
    heads: int = 3,
    mlp_ratio: float = 4.0,
) -> nn.Module:
    """A DeiT-Tiny-wide, 6-block ViT; ``width`` scales the token width 192.

    The default patch size is 2 for images up to 16x16 (8x8 digits give 16 tokens) and 4 above (64 tokens
    at 32x32, 49 at 28x28). See :class:`VisionTransformer`.
    """
    if patch_size is None:
        patch_size = 2 if image_size <= 16 else 4
    check_int("patch_size", patch_size)
    check_int("depth", depth)
    check_int("heads", heads)
    check_positive("mlp_ratio", mlp_ratio)
    return VisionTransformer(
        num_classes,
        in_channels,
        image_size,
        patch_size,
        dim=scaled(192, width),
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
    )

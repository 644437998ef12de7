"""A small pre-norm Vision Transformer with hand-written attention (separate q, k, v, proj)."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["Attention", "ViTBlock", "ViT", "vit"]


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` Linears.

    x [B, N, dim] -> q, k, v [B, heads, N, head_dim] -> softmax(q k^T * scale) v
    -> [B, N, dim] -> proj -> [B, N, dim].
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, hd]
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, hd]
        v = self.v(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, hd]
        attn = (q @ k.transpose(-2, -1)) * self.scale  # [B, h, N, N]
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.dim)  # [B, N, dim]
        return self.proj(out)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); [B, N, dim] -> same.

    ``mlp`` is nn.Sequential(Linear(dim, mlp_dim), GELU, Linear(mlp_dim, dim)).
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, dim] -> [B, N, dim]."""
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class ViT(nn.Module):
    """Patch embedding -> [cls] + tokens + pos_embed -> blocks -> LayerNorm -> head(cls token).

    Input images [B, in_channels, image_size, image_size] -> logits [B, num_classes].
    Tokens are [B, N + 1, dim] with N = (image_size // patch_size) ** 2.

    Modules/parameters: ``patch_embed`` (Conv2d, kernel = stride = patch_size),
    ``cls_token`` [1, 1, dim], ``pos_embed`` [1, N + 1, dim], ``blocks``
    (nn.ModuleList of ViTBlock), ``norm`` (LayerNorm), ``head`` (Linear).
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        image_size = positive_int("vit", "image_size", image_size)
        patch_size = positive_int("vit", "patch_size", patch_size)
        dim = positive_int("vit", "dim", dim)
        depth = positive_int("vit", "depth", depth)
        heads = positive_int("vit", "heads", heads)
        mlp_dim = positive_int("vit", "mlp_dim", mlp_dim)
        num_classes = positive_int("vit", "num_classes", num_classes)
        in_channels = positive_int("vit", "in_channels", in_channels)
        if dim % heads != 0:
            raise ConfigError(f"vit: dim ({dim}) must be divisible by heads ({heads})")
        if image_size % patch_size != 0:
            raise ConfigError(
                f"vit: image_size ({image_size}) must be divisible by patch_size ({patch_size})"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.dim = dim
        self.depth = depth
        self.heads = heads
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.num_patches = (image_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, S, S] -> logits [B, num_classes]."""
        x = self.patch_embed(x)  # [B, dim, S/p, S/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, dim]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # [B, 1, dim]
        x = torch.cat([cls, x], dim=1)  # [B, N + 1, dim]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])  # [B, num_classes]


def vit(
    image_size: int = 28,
    patch_size: int = 7,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 128,
    num_classes: int = 10,
    in_channels: int = 1,
) -> ViT:
    """Build a small ViT: [B, in_channels, image_size, image_size] -> [B, num_classes]."""
    return ViT(
        image_size=image_size,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=mlp_dim,
        num_classes=num_classes,
        in_channels=in_channels,
    )

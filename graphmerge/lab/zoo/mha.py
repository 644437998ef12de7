"""A small pre-norm transformer classifier over image patches using nn.MultiheadAttention."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["MHABlock", "MHAClassifier", "mha"]


class MHABlock(nn.Module):
    """x + MHA(ln1(x)) (batch_first), then x + mlp(ln2(x)): [B, N, dim] -> same."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class MHAClassifier(nn.Module):
    """Patch conv -> + pos -> MHABlocks -> LayerNorm -> mean over tokens -> Linear.

    Input [B, in_channels, image_size, image_size] -> logits [B, num_classes].
    """

    def __init__(self, image_size: int = 28, patch_size: int = 7, dim: int = 32, depth: int = 2,
                 heads: int = 4, mlp_dim: int = 64, num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        image_size = positive_int("mha", "image_size", image_size)
        patch_size = positive_int("mha", "patch_size", patch_size)
        dim = positive_int("mha", "dim", dim)
        depth = positive_int("mha", "depth", depth)
        heads = positive_int("mha", "heads", heads)
        mlp_dim = positive_int("mha", "mlp_dim", mlp_dim)
        num_classes = positive_int("mha", "num_classes", num_classes)
        in_channels = positive_int("mha", "in_channels", in_channels)
        if dim % heads != 0:
            raise ConfigError(f"mha: dim ({dim}) must be divisible by heads ({heads})")
        if image_size % patch_size != 0:
            raise ConfigError(
                f"mha: image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[MHABlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, S, S] -> logits [B, num_classes]."""
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # [B, N, dim]
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def mha(image_size: int = 28, patch_size: int = 7, dim: int = 32, depth: int = 2, heads: int = 4,
        mlp_dim: int = 64, num_classes: int = 10, in_channels: int = 1) -> MHAClassifier:
    """Build a patch transformer with nn.MultiheadAttention: [B, C, S, S] -> [B, num_classes]."""
    return MHAClassifier(image_size, patch_size, dim, depth, heads, mlp_dim, num_classes,
                         in_channels)

"""A LeViT-style model: conv stem, attention whose logits get a learned bias looked up from a
table by relative position (`attention_biases[:, attention_bias_idxs]`, cached per device in
eval mode as timm does), Linear+BatchNorm1d layers, and a shape assertion (`torch._assert`)."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["LinearNorm", "LeViTAttention", "LeViT", "levit"]


class LinearNorm(nn.Module):
    """Linear then BatchNorm1d over the flattened batch and token axes: [B, N, a] -> [B, N, b]."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTAttention(nn.Module):
    """Multi-head attention on [B, N, dim] with q·kᵀ * scale + a relative-position bias table."""

    def __init__(self, dim: int, key_dim: int, heads: int, resolution: int) -> None:
        super().__init__()
        self.heads, self.key_dim, self.scale = heads, key_dim, key_dim ** -0.5
        self.qkv = LinearNorm(dim, heads * 3 * key_dim)
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * key_dim, dim))
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(0.1 * torch.randn(heads, len(offsets)))
        n = len(points)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n),
                             persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> LeViTAttention:
        super().train(mode)
        if mode:
            self.attention_bias_cache = {}  # the parameters may change: drop the cached biases
        return self

    def attention_bias(self, device: torch.device) -> torch.Tensor:
        """[heads, N, N] biases; in eval mode cached per device (timm's LeViT does this)."""
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split(
            [self.key_dim, self.key_dim, self.key_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = q @ k * self.scale + self.attention_bias(x.device)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(x)


class LeViT(nn.Module):
    """Conv stem (stride 4) -> tokens -> (attention + MLP residual blocks) -> mean -> BN -> Linear."""

    def __init__(self, dim: int, heads: int, depth: int, num_classes: int, in_channels: int,
                 image_size: int) -> None:
        super().__init__()
        if image_size % 4:
            raise ConfigError(f"levit: image_size must be divisible by 4, got {image_size}")
        self.dim = dim
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim // 2, 3, 2, 1), nn.Hardswish(),
                                  nn.Conv2d(dim // 2, dim, 3, 2, 1))
        self.attn = nn.ModuleList(LeViTAttention(dim, dim // heads, heads, image_size // 4)
                                  for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(),
                                               LinearNorm(2 * dim, dim)) for _ in range(depth))
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.stem(x)
        torch._assert(x.shape[1] == self.dim, "levit: the stem gives dim channels")
        x = x.flatten(2).transpose(1, 2)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(F.relu(self.norm(x.mean(1))))


def levit(dim: int = 32, heads: int = 4, depth: int = 2, num_classes: int = 10,
          in_channels: int = 3, image_size: int = 32) -> LeViT:
    """A small LeViT-style model: [B, in_channels, S, S] (S divisible by 4) -> [B, num_classes]."""
    dim, heads = positive_int("levit", "dim", dim), positive_int("levit", "heads", heads)
    if dim % heads or dim % 2:
        raise ConfigError(f"levit: dim must be even and divisible by heads, got {dim}, {heads}")
    return LeViT(dim, heads, positive_int("levit", "depth", depth),
                 positive_int("levit", "num_classes", num_classes),
                 positive_int("levit", "in_channels", in_channels),
                 positive_int("levit", "image_size", image_size))

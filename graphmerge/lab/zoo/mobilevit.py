"""A MobileViT-style model: a block that unfolds a feature map into patches by reshape and
transpose, runs a small transformer across the patches, folds back, and fuses with its input."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["TransformerLayer", "MobileViTBlock", "MobileViT", "mobilevit"]


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())


class TransformerLayer(nn.Module):
    """Pre-norm self-attention (fused qkv, `heads` heads) and MLP on [B, N, d]."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        x = x + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MobileViTBlock(nn.Module):
    """conv 3×3 -> 1×1 to d -> unfold into 2×2 patches -> transformer -> fold -> 1×1 back ->
    cat with the input -> conv 3×3: [B, C, H, W] -> [B, C, H, W] (H, W even)."""

    def __init__(self, c: int, d: int, heads: int, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.conv_kxk, self.conv_1x1 = _conv(c, c, 3), nn.Conv2d(c, d, 1, bias=False)
        self.transformer = TransformerLayer(d, heads)
        self.norm = nn.LayerNorm(d)
        self.conv_proj, self.conv_fusion = _conv(d, c, 1), _conv(2 * c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))
        b, c, h, w = x.shape
        p = self.patch
        nh, nw = h // p, w // p
        x = x.reshape(b * c * nh, p, nw, p).transpose(1, 2)  # [B·C·nh, nw, p, p]
        x = x.reshape(b, c, nh * nw, p * p).transpose(1, 3).reshape(b * p * p, nh * nw, c)
        x = self.norm(self.transformer(x))
        x = x.contiguous().view(b, p * p, nh * nw, c).transpose(1, 3)
        x = x.reshape(b * c * nh, nw, p, p).transpose(1, 2).reshape(b, c, nh * p, nw * p)
        return self.conv_fusion(torch.cat((shortcut, self.conv_proj(x)), 1))


class MobileViT(nn.Module):
    """Stem (stride 2) -> conv (stride 2) -> MobileViT block -> 1×1 -> pool -> Linear."""

    def __init__(self, c: int, d: int, heads: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, c // 2, 3, 2), _conv(c // 2, c, 3, 2))
        self.block = MobileViTBlock(c, d, heads)
        self.final = _conv(c, 2 * c, 1)
        self.head = nn.Linear(2 * c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] (H, W divisible by 8) -> logits [B, num_classes]."""
        x = self.final(self.block(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilevit(channels: int = 24, dim: int = 32, heads: int = 2, num_classes: int = 10,
              in_channels: int = 3) -> MobileViT:
    """A small MobileViT-style model: [B, in_channels, H, W] -> [B, num_classes]."""
    channels, dim = positive_int("mobilevit", "channels", channels), positive_int(
        "mobilevit", "dim", dim)
    heads = positive_int("mobilevit", "heads", heads)
    if dim % heads or channels % 2:
        raise ConfigError(f"mobilevit: heads must divide dim and channels be even, got "
                          f"dim={dim}, heads={heads}, channels={channels}")
    return MobileViT(channels, dim, heads, positive_int("mobilevit", "num_classes", num_classes),
                     positive_int("mobilevit", "in_channels", in_channels))

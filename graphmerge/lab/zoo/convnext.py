"""A tiny ConvNeXt: patchify stem, blocks with a channels-last LayerNorm/MLP and layer scale."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["ConvNeXtBlock", "ConvNeXt", "convnext"]


class ConvNeXtBlock(nn.Module):
    """x + permute_back(gamma * fc2(gelu(fc1(ln(permute(dwconv7x7(x))))))): [B, dim, H, W] -> same."""

    def __init__(self, dim: int, layer_scale: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x)
        h = h.permute(0, 2, 3, 1)  # [B, H, W, dim]
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        h = self.gamma * h
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """stem (conv kernel = stride = patch) -> stage -> (downsample conv k=s=2 -> stage)* -> head.

    Input [B, in_channels, H, W] -> logits [B, num_classes]. Stage i has ``dims[i]`` channels and
    ``depths[i]`` blocks. Head: global average pool -> LayerNorm -> Linear.
    ``layer_scale`` is the initial value of every gamma (ConvNeXt uses 1e-6; 0.1 keeps the blocks
    visible in the output of a randomly initialised model).
    """

    def __init__(self, dims: Sequence[int] = (16, 32), depths: Sequence[int] = (1, 1),
                 patch: int = 2, layer_scale: float = 0.1, num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        dims = positive_ints("convnext", "dims", dims)
        depths = positive_ints("convnext", "depths", depths, len(dims))
        patch = positive_int("convnext", "patch", patch)
        num_classes = positive_int("convnext", "num_classes", num_classes)
        in_channels = positive_int("convnext", "in_channels", in_channels)
        if isinstance(layer_scale, bool) or not isinstance(layer_scale, (int, float)):
            raise ConfigError(f"convnext: layer_scale must be a number, got {layer_scale!r}")
        self.stem = nn.Conv2d(in_channels, dims[0], kernel_size=patch, stride=patch)
        layers: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i > 0:
                layers.append(nn.Conv2d(dims[i - 1], dim, kernel_size=2, stride=2))
            layers.extend(ConvNeXtBlock(dim, float(layer_scale)) for _ in range(depth))
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))


def convnext(dims: Sequence[int] = (16, 32), depths: Sequence[int] = (1, 1), patch: int = 2,
             layer_scale: float = 0.1, num_classes: int = 10, in_channels: int = 1) -> ConvNeXt:
    """Build a tiny ConvNeXt: [B, in_channels, H, W] -> [B, num_classes]."""
    return ConvNeXt(dims, depths, patch, layer_scale, num_classes, in_channels)

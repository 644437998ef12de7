"""A tiny DenseNet: dense blocks that concatenate each layer's new features onto its input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["DenseLayer", "Transition", "DenseNet", "densenet"]


class DenseLayer(nn.Module):
    """BN -> ReLU -> 3x3 conv giving ``growth`` channels; returns cat([x, new], 1).

    [B, C, H, W] -> [B, C + growth, H, W].
    """

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv(self.relu(self.norm(x)))
        return torch.cat([x, new], 1)


class Transition(nn.Module):
    """BN -> ReLU -> 1x1 conv -> 2x2 average pool: [B, C, H, W] -> [B, c_out, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.norm(x))))


class DenseNet(nn.Module):
    """3x3 stem -> dense block -> (transition -> dense block)* -> BN-ReLU -> pool -> Linear.

    Input [B, in_channels, H, W] -> logits [B, num_classes]. ``block_layers[i]`` dense layers
    in block i, each adding ``growth`` channels; transitions halve the channels and the size.
    """

    def __init__(self, growth: int = 8, block_layers: Sequence[int] = (3, 3), stem: int = 16,
                 num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        growth = positive_int("densenet", "growth", growth)
        block_layers = positive_ints("densenet", "block_layers", block_layers)
        stem = positive_int("densenet", "stem", stem)
        num_classes = positive_int("densenet", "num_classes", num_classes)
        in_channels = positive_int("densenet", "in_channels", in_channels)
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        channels = stem
        for i, n in enumerate(block_layers):
            if i > 0:
                layers.append(Transition(channels, max(1, channels // 2)))
                channels = max(1, channels // 2)
            for _ in range(n):
                layers.append(DenseLayer(channels, growth))
                channels += growth
        self.features = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def densenet(growth: int = 8, block_layers: Sequence[int] = (3, 3), stem: int = 16,
             num_classes: int = 10, in_channels: int = 1) -> DenseNet:
    """Build a tiny DenseNet: [B, in_channels, H, W] -> [B, num_classes]."""
    return DenseNet(growth, block_layers, stem, num_classes, in_channels)

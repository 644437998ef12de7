"""A VGG-style net whose classifier is two convolutions (timm's ConvMlp pre-logits): features
ending at a 2×2 map, adaptively average-pooled (upsampled) to 7×7 when smaller, a 7×7 conv, an
in-place ReLU, dropout, a 1×1 conv, an in-place ReLU, global pooling and a Linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["ConvMlp", "VGGConvHead", "vgg_convhead"]


class ConvMlp(nn.Module):
    """[B, C, h, w] -> pooled up to ≥7×7 -> 7×7 conv -> ReLU -> dropout -> 1×1 conv -> ReLU."""

    def __init__(self, c_in: int, hidden: int, kernel: int = 7, drop: float = 0.2) -> None:
        super().__init__()
        self.kernel = kernel
        self.fc1 = nn.Conv2d(c_in, hidden, kernel)
        self.act1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, hidden, 1)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.kernel or x.shape[-1] < self.kernel:
            size = (max(self.kernel, x.shape[-2]), max(self.kernel, x.shape[-1]))
            x = F.adaptive_avg_pool2d(x, size)
        x = self.drop(self.act1(self.fc1(x)))
        return self.act2(self.fc2(x))


class VGGConvHead(nn.Module):
    """(3×3 conv -> BN -> ReLU -> 2×2 max pool) per width -> ConvMlp -> pool -> Linear.

    [B, in_channels, 32, 32] reaches a 2×2 map after four stages.
    """

    def __init__(self, widths: Sequence[int], hidden: int, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            layers += [nn.Conv2d(prev, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.pre_logits = ConvMlp(prev, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.pre_logits(self.features(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def vgg_convhead(widths: Sequence[int] = (16, 16, 16, 16), hidden: int = 32,
                 num_classes: int = 10, in_channels: int = 3) -> VGGConvHead:
    """Build the VGG with a two-conv classifier: [B, in_channels, H, W] -> [B, num_classes]."""
    return VGGConvHead(positive_ints("vgg_convhead", "widths", widths),
                       positive_int("vgg_convhead", "hidden", hidden),
                       positive_int("vgg_convhead", "num_classes", num_classes),
                       positive_int("vgg_convhead", "in_channels", in_channels))

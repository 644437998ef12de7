"""A CNN written with bare nn.Parameters and torch.nn.functional (no Conv2d/Linear modules).

Its second conv has 7 channels on a 7x7 feature map (for 28x28 inputs), so channel and spatial
axes have the same size: code that finds axes by size rather than position gets it wrong.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["FunctionalCNN", "functional_cnn"]


def _param(*shape: int, fan_in: int) -> nn.Parameter:
    """A Parameter drawn from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), like PyTorch's layer defaults."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class FunctionalCNN(nn.Module):
    """conv3x3 -> relu -> maxpool -> conv3x3 -> relu -> maxpool -> flatten -> linear -> relu -> linear.

    Input [B, in_channels, S, S] (S divisible by 4) -> logits [B, num_classes]. Channels are
    ``c1`` then ``c2`` (default 7, on an S/4 = 7 map); ``hidden`` is the hidden Linear width.
    """

    def __init__(self, c1: int = 8, c2: int = 7, hidden: int = 32, num_classes: int = 10,
                 in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        c1 = positive_int("functional", "c1", c1)
        c2 = positive_int("functional", "c2", c2)
        hidden = positive_int("functional", "hidden", hidden)
        num_classes = positive_int("functional", "num_classes", num_classes)
        in_channels = positive_int("functional", "in_channels", in_channels)
        image_size = positive_int("functional", "image_size", image_size)
        if image_size % 4 != 0:
            raise ConfigError(f"functional: image_size must be divisible by 4, got {image_size}")
        flat = c2 * (image_size // 4) ** 2
        self.w1 = _param(c1, in_channels, 3, 3, fan_in=in_channels * 9)
        self.b1 = _param(c1, fan_in=in_channels * 9)
        self.w2 = _param(c2, c1, 3, 3, fan_in=c1 * 9)
        self.b2 = _param(c2, fan_in=c1 * 9)
        self.w3 = _param(hidden, flat, fan_in=flat)
        self.b3 = _param(hidden, fan_in=flat)
        self.w4 = _param(num_classes, hidden, fan_in=hidden)
        self.b4 = _param(num_classes, fan_in=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, S, S] -> logits [B, num_classes]."""
        h = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)), 2)  # [B, c1, S/2, S/2]
        h = F.max_pool2d(F.relu(F.conv2d(h, self.w2, self.b2, padding=1)), 2)  # [B, c2, S/4, S/4]
        h = F.relu(F.linear(torch.flatten(h, 1), self.w3, self.b3))
        return F.linear(h, self.w4, self.b4)


def functional_cnn(c1: int = 8, c2: int = 7, hidden: int = 32, num_classes: int = 10,
                   in_channels: int = 1, image_size: int = 28) -> FunctionalCNN:
    """Build the functional-style CNN: [B, in_channels, S, S] -> [B, num_classes]."""
    return FunctionalCNN(c1, c2, hidden, num_classes, in_channels, image_size)

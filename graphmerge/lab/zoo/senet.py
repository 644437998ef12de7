"""A small ResNet whose blocks recalibrate channels with squeeze-and-excitation (SE)."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["SqueezeExcite", "SEBlock", "SENet", "senet"]


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(avgpool(x))))) per channel: [B, C, H, W] -> same."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, max(1, channels // reduction))
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(max(1, channels // reduction), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        s = self.pool(x).view(b, c)
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(s))))
        return x * s.view(b, c, 1, 1)


class SEBlock(nn.Module):
    """relu(se(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x)): [B, c_in, H, W] -> [B, c_out, H', W']."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduction: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.se = SqueezeExcite(c_out, reduction)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))


class SENet(nn.Module):
    """3x3 stem -> SEBlocks (channels (16, 32) * width, strides (1, 2)) -> pool -> Linear.

    Input [B, in_channels, H, W] -> logits [B, num_classes].
    """

    def __init__(self, depths: tuple[int, int] = (1, 1), width: int = 1, reduction: int = 4,
                 num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        depths = positive_ints("senet", "depths", depths, 2)
        width = positive_int("senet", "width", width)
        reduction = positive_int("senet", "reduction", reduction)
        num_classes = positive_int("senet", "num_classes", num_classes)
        in_channels = positive_int("senet", "in_channels", in_channels)
        channels = (16 * width, 32 * width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks: list[nn.Module] = []
        prev = channels[0]
        for c_out, stride, depth in zip(channels, (1, 2), depths):
            for i in range(depth):
                blocks.append(SEBlock(prev, c_out, stride if i == 0 else 1, reduction))
                prev = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def senet(depths: tuple[int, int] = (1, 1), width: int = 1, reduction: int = 4,
          num_classes: int = 10, in_channels: int = 1) -> SENet:
    """Build a small SE-ResNet: [B, in_channels, H, W] -> [B, num_classes]."""
    return SENet(depths, width, reduction, num_classes, in_channels)

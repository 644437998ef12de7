"""CIFAR-style ResNet (3 stages of BasicBlocks) sized for 28x28 single-channel images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["BasicBlock", "ResNet", "resnet"]


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1, no bias: [B, c_in, H, W] -> [B, c_out, ceil(H/stride), ceil(W/stride)]."""
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Input [B, c_in, H, W] -> output [B, c_out, H', W'] with H' = ceil(H / stride).
    ``shortcut`` is nn.Identity() when stride == 1 and c_in == c_out, else
    nn.Sequential(1x1 conv(stride), BatchNorm2d).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(c_out, c_out, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, c_in, H, W] -> [B, c_out, H', W']."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem (conv3x3 -> BN -> ReLU) -> 3 stages of BasicBlocks -> global avg pool -> Linear.

    Input images [B, in_channels, H, W] (28x28 by default) -> logits [B, num_classes].
    Stage channels are (16, 32, 64) * width with strides (1, 2, 2).

    Modules: ``stem`` (nn.Sequential), ``stages`` (nn.ModuleList of nn.Sequential
    of BasicBlock), ``pool`` (nn.AdaptiveAvgPool2d(1)), ``head`` (nn.Linear).
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 2),
        width: int = 1,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or len(depths) != 3:
            raise ConfigError(
                f"resnet: depths must be a tuple of 3 positive ints (blocks per stage), got {depths!r}"
            )
        depth_list = [positive_int("resnet", f"depths[{i}]", d) for i, d in enumerate(depths)]
        width = positive_int("resnet", "width", width)
        num_classes = positive_int("resnet", "num_classes", num_classes)
        in_channels = positive_int("resnet", "in_channels", in_channels)
        stem_stride = positive_int("resnet", "stem_stride", stem_stride)
        self.depths = tuple(depth_list)
        self.width = width
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stem_stride = stem_stride

        channels = (16 * width, 32 * width, 64 * width)
        strides = (1, 2, 2)
        self.stem = nn.Sequential(
            _conv3x3(in_channels, channels[0], stem_stride),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        stages: list[nn.Sequential] = []
        prev = channels[0]
        for c_out, stride, depth in zip(channels, strides, depth_list):
            blocks = [BasicBlock(prev, c_out, stride)]
            blocks += [BasicBlock(c_out, c_out, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = c_out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(x)


def resnet(
    depths: Sequence[int] = (2, 2, 2),
    width: int = 1,
    num_classes: int = 10,
    in_channels: int = 1,
    stem_stride: int = 1,
) -> ResNet:
    """Build a CIFAR-style ResNet: [B, in_channels, H, W] -> [B, num_classes]."""
    return ResNet(
        depths=depths,
        width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        stem_stride=stem_stride,
    )

"""Grouped bottlenecks: ResNeXt-style (a fixed number of groups) and RegNet-style (a fixed group
width, optional squeeze-and-excitation built from 1×1 convs)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["GroupedBottleneck", "GroupedNet", "resnext", "regnet"]


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out))


class SEConv(nn.Module):
    """x * sigmoid(conv1x1(relu(conv1x1(mean over H, W)))) — RegNet's SE on 1×1 convs."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.fc2(F.relu(self.fc1(s))).sigmoid()


class GroupedBottleneck(nn.Module):
    """1×1 -> grouped 3×3 (stride) -> [SE] -> 1×1, each with BN, plus a shortcut; ReLU."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int, groups: int,
                 se: int = 0) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, mid, 1)
        self.conv2 = _conv_bn(mid, mid, 3, stride, groups)
        self.se: nn.Module = SEConv(mid, se) if se else nn.Identity()
        self.conv3 = _conv_bn(mid, c_out, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _conv_bn(c_in, c_out, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv2(F.relu(self.conv1(x))))
        out = self.conv3(self.se(out))
        return F.relu(out + self.shortcut(x))


class GroupedNet(nn.Module):
    """Stem -> grouped bottlenecks per stage (stage i: (mid, out, groups, se), stride 2 after
    the first) -> pool -> Linear. [B, in_channels, H, W] -> [B, num_classes]."""

    def __init__(self, stages: list[tuple[int, int, int, int]], stem: int, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, stem, 3), nn.ReLU())
        blocks, prev = [], stem
        for i, (mid, out, groups, se) in enumerate(stages):
            blocks.append(GroupedBottleneck(prev, mid, out, 1 if i == 0 else 2, groups, se))
            prev = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnext(groups: int = 4, width: int = 1, num_classes: int = 10, in_channels: int = 3
            ) -> GroupedNet:
    """ResNeXt-style: bottlenecks with `groups` groups in the 3×3 (mid widths 16, 32 × width)."""
    groups = positive_int("resnext", "groups", groups)
    width = positive_int("resnext", "width", width)
    if (16 * width) % groups:
        raise ConfigError(f"resnext: groups must divide 16 * width, got groups={groups}")
    stages = [(16 * width, 32 * width, groups, 0), (32 * width, 64 * width, groups, 0)]
    return GroupedNet(stages, 16 * width, positive_int("resnext", "num_classes", num_classes),
                      positive_int("resnext", "in_channels", in_channels))


def regnet(group_width: int = 8, widths: tuple[int, int] = (24, 48), se: bool = True,
           num_classes: int = 10, in_channels: int = 3) -> GroupedNet:
    """RegNetY-style: bottleneck ratio 1, groups = width / group_width, SE at 1/4 of the input."""
    group_width = positive_int("regnet", "group_width", group_width)
    if not isinstance(widths, (tuple, list)) or len(widths) != 2 or any(
            positive_int("regnet", "widths", w) % group_width for w in widths):
        raise ConfigError(f"regnet: widths must be 2 multiples of group_width, got {widths!r}")
    stages = [(w, w, w // group_width, max(1, w // 4) if se else 0) for w in widths]
    return GroupedNet(stages, 16, positive_int("regnet", "num_classes", num_classes),
                      positive_int("regnet", "in_channels", in_channels))

"""A tiny MobileNetV2: stem conv, inverted residual blocks (expand, depthwise, project), head."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet"]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
             act: bool = True) -> nn.Sequential:
    """conv (no bias, 'same' padding) -> BatchNorm2d [-> ReLU6]."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (groups = hidden) -> 1x1 linear project, + x when shapes agree.

    [B, c_in, H, W] -> [B, c_out, ceil(H / stride), ceil(W / stride)].
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.expand = _conv_bn(c_in, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, c_out, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.use_residual:
            out = x + out
        return out


class MobileNetV2(nn.Module):
    """stem (3x3 conv-BN-ReLU6) -> 3 stages of InvertedResidual -> 1x1 conv-BN-ReLU6 -> pool -> Linear.

    Input [B, in_channels, H, W] (28x28 by default) -> logits [B, num_classes]. Stage channels are
    (8, 16, 24) * width with strides (1, 2, 2) and ``depths`` blocks each; ``last`` is the width
    of the final 1x1 conv.
    """

    def __init__(self, width: int = 1, depths: tuple[int, int, int] = (1, 2, 2), expand: int = 4,
                 last: int = 64, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        width = positive_int("mobilenet", "width", width)
        expand = positive_int("mobilenet", "expand", expand)
        last = positive_int("mobilenet", "last", last)
        num_classes = positive_int("mobilenet", "num_classes", num_classes)
        in_channels = positive_int("mobilenet", "in_channels", in_channels)
        depths = positive_ints("mobilenet", "depths", depths, 3)
        channels = [c * width for c in (8, 16, 24)]
        self.stem = _conv_bn(in_channels, channels[0], 3)
        blocks: list[nn.Module] = []
        prev = channels[0]
        for c_out, stride, depth in zip(channels, (1, 2, 2), depths):
            for i in range(depth):
                blocks.append(InvertedResidual(prev, c_out, stride if i == 0 else 1, expand))
                prev = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last = _conv_bn(prev, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.last(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenet(width: int = 1, depths: tuple[int, int, int] = (1, 2, 2), expand: int = 4,
              last: int = 64, num_classes: int = 10, in_channels: int = 1) -> MobileNetV2:
    """Build a tiny MobileNetV2: [B, in_channels, H, W] -> [B, num_classes]."""
    return MobileNetV2(width, depths, expand, last, num_classes, in_channels)

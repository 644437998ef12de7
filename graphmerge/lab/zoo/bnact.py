"""Norm+activation blocks (timm's BatchNormAct2d style) and a small ResNet built from them.

`BatchNormAct2d` subclasses nn.BatchNorm2d but its forward calls the functional
`F.batch_norm` and then an activation, so no BatchNorm2d module call appears in the graph.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.lab.zoo._checks import positive_int

__all__ = ["BatchNormAct2d", "ConvNormAct", "BNActBlock", "BNActResNet", "bnact_resnet"]


class BatchNormAct2d(nn.BatchNorm2d):
    """F.batch_norm (running statistics in eval) then ReLU (or nothing when `act` is False)."""

    def __init__(self, num_features: int, act: bool = True, eps: float = 1e-5) -> None:
        super().__init__(num_features, eps=eps)
        self.act: nn.Module = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats
                         else None, self.running_var if not self.training or
                         self.track_running_stats else None, self.weight, self.bias, use_batch,
                         factor, self.eps)
        return self.act(x)


class ConvNormAct(nn.Sequential):
    """k×k conv (no bias, 'same' padding) -> BatchNormAct2d: [B, c_in, H, W] -> [B, c_out, H/s, W/s]."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         BatchNormAct2d(c_out, act))


class BNActBlock(nn.Module):
    """relu(convnormact(convnormact(x)) + shortcut(x)), every norm a BatchNormAct2d."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(c_in, c_out, 3, stride)
        self.conv2 = ConvNormAct(c_out, c_out, 3, 1, act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = ConvNormAct(c_in, c_out, 1, stride, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class BNActResNet(nn.Module):
    """Stem -> BNActBlocks at widths (16, 32) * width, strides (1, 2) -> pool -> Linear.

    Input [B, in_channels, H, W] -> logits [B, num_classes].
    """

    def __init__(self, width: int = 1, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        width = positive_int("bnact_resnet", "width", width)
        num_classes = positive_int("bnact_resnet", "num_classes", num_classes)
        in_channels = positive_int("bnact_resnet", "in_channels", in_channels)
        c1, c2 = 16 * width, 32 * width
        self.stem = ConvNormAct(in_channels, c1, 3)
        self.blocks = nn.Sequential(BNActBlock(c1, c1, 1), BNActBlock(c1, c2, 2))
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def bnact_resnet(width: int = 1, num_classes: int = 10, in_channels: int = 3) -> BNActResNet:
    """Build a small ResNet of norm+act blocks: [B, in_channels, H, W] -> [B, num_classes]."""
    return BNActResNet(width, num_classes, in_channels)

"""Weight-standardised and norm-free families: a BiT-style CNN (weights standardised per output
unit before F.conv2d, GroupNorm), a plain GroupNorm CNN, and a normaliser-free ResNet (scaled
weight standardisation with a learned gain, `x * alpha` / `1 / beta` scalars, no norms)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.lab.zoo._checks import positive_int

__all__ = ["StdConv2d", "ScaledStdConv2d", "WSNet", "GNCNN", "NFBlock", "NFResNet",
           "wsconv", "gncnn", "nfnet"]


class StdConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised (zero mean, unit variance) per output unit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (self.weight - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d: F.batch_norm over each output unit's weights, scaled by a learned
    per-unit gain and fan_in^-0.5."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, k, stride, k // 2)
        self.gain = nn.Parameter(torch.ones(c_out, 1, 1, 1))
        self.scale = (c_in * k * k) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    """(StdConv 3×3 -> GroupNorm -> ReLU) ×3 with a residual on the last, pool, Linear."""

    def __init__(self, width: int, groups: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = StdConv2d(in_channels, width, 3, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, width)
        self.conv2 = StdConv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, 2 * width)
        self.conv3 = StdConv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.gn3 = nn.GroupNorm(groups, 2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        x = F.relu(x + self.gn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


class GNCNN(nn.Module):
    """(Conv 3×3 -> GroupNorm -> ReLU -> [maxpool]) ×3 -> pool -> Linear."""

    def __init__(self, width: int, groups: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        widths = (width, 2 * width, 2 * width)
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(prev, w, 3, 1, 1), nn.GroupNorm(groups, w), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < 2 else []
            prev = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


class NFBlock(nn.Module):
    """out = conv2(act(conv1(act(x) / beta))) * alpha + shortcut, shortcut = x or a conv of
    act(x) / beta; act is gamma-scaled ReLU (variance preserving)."""

    def __init__(self, c_in: int, c_out: int, stride: int, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = alpha, beta, 1.7139
        self.conv1 = ScaledStdConv2d(c_in, c_out, 3, stride)
        self.conv2 = ScaledStdConv2d(c_out, c_out, 3)
        self.down = ScaledStdConv2d(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out \
            else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x) * self.gamma / self.beta
        shortcut = x if self.down is None else self.down(out)
        out = self.conv2(F.relu(self.conv1(out)) * self.gamma)
        return out * self.alpha + shortcut


class NFResNet(nn.Module):
    """Stem -> NF blocks (widths 16, 16, 32) with the expected variance tracked -> Linear."""

    def __init__(self, num_classes: int, in_channels: int, alpha: float = 0.2) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(in_channels, 16, 3)
        blocks, prev, var = [], 16, 1.0
        for w, stride in ((16, 1), (16, 1), (32, 2)):
            blocks.append(NFBlock(prev, w, stride, alpha, var ** 0.5))
            var = 1.0 + alpha ** 2 if prev != w or stride != 1 else var + alpha ** 2
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = F.relu(self.blocks(self.stem(x)))
        return self.head(x.mean((2, 3)))


def wsconv(width: int = 16, groups: int = 4, num_classes: int = 10, in_channels: int = 3
           ) -> WSNet:
    """A BiT-style weight-standardised CNN with GroupNorm: [B, C, H, W] -> [B, num_classes]."""
    return WSNet(positive_int("wsconv", "width", width), positive_int("wsconv", "groups", groups),
                 positive_int("wsconv", "num_classes", num_classes),
                 positive_int("wsconv", "in_channels", in_channels))


def gncnn(width: int = 16, groups: int = 4, num_classes: int = 10, in_channels: int = 3) -> GNCNN:
    """A plain GroupNorm CNN: [B, in_channels, H, W] -> [B, num_classes]."""
    return GNCNN(positive_int("gncnn", "width", width), positive_int("gncnn", "groups", groups),
                 positive_int("gncnn", "num_classes", num_classes),
                 positive_int("gncnn", "in_channels", in_channels))


def nfnet(num_classes: int = 10, in_channels: int = 3) -> NFResNet:
    """A normaliser-free ResNet: [B, in_channels, H, W] -> [B, num_classes]."""
    return NFResNet(positive_int("nfnet", "num_classes", num_classes),
                    positive_int("nfnet", "in_channels", in_channels))

"""Concatenating families built from the functional norm (BatchNormAct2d): a DenseNet with
feature lists, a DPN (dual path: residual part added, dense part concatenated, split by channel
slicing) and a VoVNet (one-shot aggregation of several convs, then a 1×1 conv and eSE)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.lab.zoo._checks import positive_int
from graphmerge.lab.zoo.bnact import BatchNormAct2d, ConvNormAct

__all__ = ["DenseBlockFn", "DenseNetFn", "DualPathBlock", "DPN", "OSABlock", "VoVNet",
           "densenet_fn", "dpn", "vovnet"]


class DenseBlockFn(nn.Module):
    """Layers BNAct -> 1×1 -> BNAct -> 3×3 (growth), each reading cat(all earlier features)."""

    def __init__(self, c_in: int, layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(
            BatchNormAct2d(c_in + i * growth), nn.Conv2d(c_in + i * growth, 2 * growth, 1,
                                                         bias=False),
            BatchNormAct2d(2 * growth), nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False))
            for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNetFn(nn.Module):
    """Stem -> dense block -> BNAct/1×1/avgpool transition -> dense block -> BNAct -> Linear."""

    def __init__(self, growth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        c = 2 * growth
        self.stem = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.block1 = DenseBlockFn(c, 3, growth)
        c += 3 * growth
        self.transition = nn.Sequential(BatchNormAct2d(c), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        self.block2 = DenseBlockFn(c // 2, 3, growth)
        self.norm = BatchNormAct2d(c // 2 + 3 * growth)
        self.head = nn.Linear(c // 2 + 3 * growth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.norm(self.block2(self.transition(self.block1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class DualPathBlock(nn.Module):
    """(resid, dense) -> (resid + new[:, :r], cat([dense, new[:, r:]])), new from BNAct-conv
    layers on cat(resid, dense); a projecting block slices its 1×1 projection the same way."""

    def __init__(self, c_in: int, mid: int, r: int, inc: int, project: bool, stride: int = 1
                 ) -> None:
        super().__init__()
        self.r = r
        self.proj = nn.Sequential(BatchNormAct2d(c_in), nn.Conv2d(c_in, r + 2 * inc, 1, stride,
                                                                  bias=False)) if project else None
        self.a = nn.Sequential(BatchNormAct2d(c_in), nn.Conv2d(c_in, mid, 1, bias=False))
        self.b = nn.Sequential(BatchNormAct2d(mid), nn.Conv2d(mid, mid, 3, stride, 1, bias=False))
        self.c = nn.Sequential(BatchNormAct2d(mid), nn.Conv2d(mid, r + inc, 1, bias=False))

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x_in = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.proj is not None:
            s = self.proj(x_in)
            resid, dense = s[:, :self.r], s[:, self.r:]
        else:
            resid, dense = x[0], x[1]
        new = self.c(self.b(self.a(x_in)))
        return resid + new[:, :self.r], torch.cat([dense, new[:, self.r:]], 1)


class DPN(nn.Module):
    """Stem -> dual path blocks (two stages) -> cat -> BNAct -> pool -> Linear."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, 16, 3)
        self.blocks = nn.Sequential(
            DualPathBlock(16, 16, 24, 4, True), DualPathBlock(24 + 12, 16, 24, 4, False),
            DualPathBlock(24 + 16, 24, 32, 8, True, 2), DualPathBlock(32 + 24, 24, 32, 8, False))
        self.norm = BatchNormAct2d(32 + 32)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.norm(torch.cat(self.blocks(self.stem(x)), 1))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class OSABlock(nn.Module):
    """One-shot aggregation: x -> conv -> conv -> conv, cat([x, all three]) -> 1×1 -> eSE
    (x * hardsigmoid(conv1x1(mean))), plus x when the widths agree."""

    def __init__(self, c_in: int, stage: int, c_out: int, layers: int = 3) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvNormAct(c_in if i == 0 else stage, stage, 3)
                                   for i in range(layers))
        self.concat = ConvNormAct(c_in + layers * stage, c_out, 1)
        self.ese = nn.Conv2d(c_out, c_out, 1)
        self.residual = c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs, h = [x], x
        for conv in self.convs:
            h = conv(h)
            outs.append(h)
        y = self.concat(torch.cat(outs, 1))
        y = y * F.hardsigmoid(self.ese(y.mean((2, 3), keepdim=True)))
        return y + x if self.residual else y


class VoVNet(nn.Module):
    """Stem -> OSA (16->32) -> maxpool -> OSA (32->48) -> OSA (48->48) -> pool -> Linear."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = ConvNormAct(in_channels, 16, 3, 2)
        self.stages = nn.Sequential(OSABlock(16, 12, 32), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                                    OSABlock(32, 16, 48), OSABlock(48, 16, 48))
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


def densenet_fn(growth: int = 8, num_classes: int = 10, in_channels: int = 3) -> DenseNetFn:
    """A DenseNet with feature lists and BatchNormAct2d: [B, C, H, W] -> [B, num_classes]."""
    return DenseNetFn(positive_int("densenet_fn", "growth", growth),
                      positive_int("densenet_fn", "num_classes", num_classes),
                      positive_int("densenet_fn", "in_channels", in_channels))


def dpn(num_classes: int = 10, in_channels: int = 3) -> DPN:
    """A small dual path network: [B, in_channels, H, W] -> [B, num_classes]."""
    return DPN(positive_int("dpn", "num_classes", num_classes),
               positive_int("dpn", "in_channels", in_channels))


def vovnet(num_classes: int = 10, in_channels: int = 3) -> VoVNet:
    """A small VoVNet (one-shot aggregation, eSE): [B, in_channels, H, W] -> [B, num_classes]."""
    return VoVNet(positive_int("vovnet", "num_classes", num_classes),
                  positive_int("vovnet", "in_channels", in_channels))

"""Multi-branch blocks: Inception (parallel branches of uneven widths, concatenated), RepVGG
(3×3 conv+BN, 1×1 conv+BN and an identity BN, summed) and Res2Net (channel pieces from
`torch.split`, hierarchical adds, concatenated)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int, positive_ints

__all__ = ["BasicConv2d", "InceptionBlock", "RepVGGBlock", "Res2Block", "BranchNet",
           "inception", "repvgg", "res2net"]


class BasicConv2d(nn.Module):
    """torchvision's Inception conv: conv (no bias) -> BN (eps 1e-3) -> in-place ReLU."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionBlock(nn.Module):
    """cat([1×1, 1×1->3×3, 1×1->3×3->3×3 (a 5×5), avgpool->1×1], 1) with widths `w`."""

    def __init__(self, c_in: int, w: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.b1 = BasicConv2d(c_in, w[0], 1)
        self.b3 = nn.Sequential(BasicConv2d(c_in, w[1] // 2, 1), BasicConv2d(w[1] // 2, w[1], 3))
        self.b5 = nn.Sequential(BasicConv2d(c_in, w[2] // 2, 1), BasicConv2d(w[2] // 2, w[2], 3),
                                BasicConv2d(w[2], w[2], 3))
        self.pool = BasicConv2d(c_in, w[3], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(F.avg_pool2d(x, 3, 1, 1))
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), pooled], 1)


class RepVGGBlock(nn.Module):
    """relu(BN(3×3 conv) + BN(1×1 conv) + BN(x)), the identity BN only when shapes agree."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                                   nn.BatchNorm2d(c_out))
        self.one = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                 nn.BatchNorm2d(c_out))
        self.identity = nn.BatchNorm2d(c_out) if c_in == c_out and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.one(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return F.relu(out)


class Res2Block(nn.Module):
    """1×1 -> split into `pieces` -> y1 = conv(p1), yi = conv(pi + y(i-1)), last piece kept ->
    cat -> 1×1, BN throughout, plus a shortcut. The last piece may differ in width."""

    def __init__(self, c_in: int, pieces: tuple[int, ...], c_out: int, stride: int) -> None:
        super().__init__()
        if len(set(pieces[:-1])) != 1:
            raise ConfigError(f"res2net: all pieces but the last must be equal, got {pieces}")
        self.pieces, mid, w = list(pieces), sum(pieces), pieces[0]
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(w, w, 3, 1, 1, bias=False),
                                                 nn.BatchNorm2d(w)) for _ in pieces[:-1])
        self.conv3 = nn.Sequential(nn.Conv2d(mid, c_out, 1, stride, bias=False),
                                   nn.BatchNorm2d(c_out))
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(F.relu(self.conv1(x)), self.pieces, dim=1)
        outs: list[torch.Tensor] = []
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else outs[-1] + spx[i]
            outs.append(F.relu(conv(sp)))
        outs.append(spx[-1])
        return F.relu(self.conv3(torch.cat(outs, 1)) + self.shortcut(x))


class BranchNet(nn.Module):
    """Stem (3×3, 16) -> blocks -> global pool -> Linear: [B, C, H, W] -> [B, num_classes]."""

    def __init__(self, blocks: list[nn.Module], c_last: int, num_classes: int,
                 in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> logits [B, num_classes]."""
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def inception(num_classes: int = 10, in_channels: int = 3) -> BranchNet:
    """Two Inception blocks (widths 8/12/6/4 and 12/16/8/8) around a max pool."""
    blocks = [InceptionBlock(16, (8, 12, 6, 4)), nn.MaxPool2d(3, 2, 1),
              InceptionBlock(30, (12, 16, 8, 8))]
    return BranchNet(blocks, 44, positive_int("inception", "num_classes", num_classes),
                     positive_int("inception", "in_channels", in_channels))


def repvgg(widths: Sequence[int] = (16, 24, 24), num_classes: int = 10, in_channels: int = 3
           ) -> BranchNet:
    """RepVGG blocks at `widths`; a block changing width strides by 2, others keep the identity."""
    widths = positive_ints("repvgg", "widths", widths)
    blocks, prev = [], 16
    for w in widths:
        blocks.append(RepVGGBlock(prev, w, 1 if w == prev else 2))
        prev = w
    return BranchNet(blocks, prev, positive_int("repvgg", "num_classes", num_classes),
                     positive_int("repvgg", "in_channels", in_channels))


def res2net(pieces: Sequence[int] = (8, 8, 8, 6), num_classes: int = 10, in_channels: int = 3
            ) -> BranchNet:
    """Two Res2Net blocks whose 1×1 output is split into `pieces` (uneven last by default)."""
    pieces = positive_ints("res2net", "pieces", pieces)
    if len(pieces) < 2:
        raise ConfigError(f"res2net: pieces needs at least 2 widths, got {pieces!r}")
    blocks = [Res2Block(16, pieces, 32, 1), Res2Block(32, pieces, 48, 2)]
    return BranchNet(blocks, 48, positive_int("res2net", "num_classes", num_classes),
                     positive_int("res2net", "in_channels", in_channels))

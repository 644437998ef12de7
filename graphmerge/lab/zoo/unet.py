"""A tiny U-Net: two max-pool levels down, a bottleneck, transposed-conv levels up with skips."""

from __future__ import annotations

import torch
from torch import nn

from graphmerge.lab.zoo._checks import positive_int

__all__ = ["DoubleConv", "UNet", "unet"]


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BN -> ReLU) twice: [B, c_in, H, W] -> [B, c_out, H, W]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        )


class UNet(nn.Module):
    """Segmentation net: [B, in_channels, H, W] -> per-pixel logits [B, out_channels, H, W].

    H and W must be divisible by 4. Channels are base, 2 base (after one pool) and 4 base
    (bottleneck, after two pools). Each up level: ConvTranspose2d(kernel 2, stride 2), then
    cat([up, skip], dim=1) and a DoubleConv.
    """

    def __init__(self, base: int = 8, out_channels: int = 3, in_channels: int = 1) -> None:
        super().__init__()
        base = positive_int("unet", "base", base)
        out_channels = positive_int("unet", "out_channels", out_channels)
        in_channels = positive_int("unet", "in_channels", in_channels)
        self.enc1 = DoubleConv(in_channels, base)
        self.enc2 = DoubleConv(base, 2 * base)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(2 * base, 4 * base)
        self.up2 = nn.ConvTranspose2d(4 * base, 2 * base, 2, stride=2)
        self.dec2 = DoubleConv(4 * base, 2 * base)
        self.up1 = nn.ConvTranspose2d(2 * base, base, 2, stride=2)
        self.dec1 = DoubleConv(2 * base, base)
        self.out = nn.Conv2d(base, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> [B, out_channels, H, W]."""
        s1 = self.enc1(x)                           # [B, base, H, W]
        s2 = self.enc2(self.pool(s1))               # [B, 2 base, H/2, W/2]
        h = self.bottleneck(self.pool(s2))          # [B, 4 base, H/4, W/4]
        h = self.dec2(torch.cat([self.up2(h), s2], dim=1))
        h = self.dec1(torch.cat([self.up1(h), s1], dim=1))
        return self.out(h)


def unet(base: int = 8, out_channels: int = 3, in_channels: int = 1) -> UNet:
    """Build a tiny U-Net: [B, in_channels, H, W] -> [B, out_channels, H, W] (H, W divisible by 4)."""
    return UNet(base, out_channels, in_channels)

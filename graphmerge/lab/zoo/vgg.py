"""A plain VGG-style stack: conv3x3 -> BN -> ReLU blocks and max pools, flattened into an MLP head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["VGG", "vgg"]


class VGG(nn.Module):
    """features -> torch.flatten(x, 1) -> classifier.

    ``features`` (nn.Sequential): for each int c in ``channels`` a
    Conv2d(3x3, pad 1, no bias) -> BatchNorm2d -> ReLU, and for each 'M' a MaxPool2d(2).
    The C x H x W map [B, C, H, W] is flattened (no global pooling) to [B, C*H*W].
    ``classifier`` (nn.Sequential): Linear(C*H*W, hidden) -> ReLU -> Linear(hidden, num_classes).

    Input images [B, in_channels, image_size, image_size] -> logits [B, num_classes].
    """

    def __init__(
        self,
        channels: Sequence[int | str] = (32, "M", 64, "M", 128),
        hidden: int = 256,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise ConfigError(
                f"vgg: channels must be a sequence of positive ints and 'M', got {channels!r}"
            )
        hidden = positive_int("vgg", "hidden", hidden)
        num_classes = positive_int("vgg", "num_classes", num_classes)
        in_channels = positive_int("vgg", "in_channels", in_channels)
        image_size = positive_int("vgg", "image_size", image_size)

        layers: list[nn.Module] = []
        prev = in_channels
        size = image_size
        for i, item in enumerate(channels):
            if item == "M":
                if size < 2:
                    raise ConfigError(
                        f"vgg: too many 'M' pools for image_size={image_size}: "
                        f"the feature map is {size}x{size} before channels[{i}]"
                    )
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                c = positive_int("vgg", f"channels[{i}] (an int or 'M')", item)
                layers.append(nn.Conv2d(prev, c, kernel_size=3, padding=1, bias=False))
                layers.append(nn.BatchNorm2d(c))
                layers.append(nn.ReLU())
                prev = c
        self.channels = tuple(channels)
        self.hidden = hidden
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.flat_features = prev * size * size

        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, S, S] -> logits [B, num_classes]."""
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(
    channels: Sequence[int | str] = (32, "M", 64, "M", 128),
    hidden: int = 256,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
) -> VGG:
    """Build a VGG-style net: [B, in_channels, image_size, image_size] -> [B, num_classes]."""
    return VGG(
        channels=channels,
        hidden=hidden,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
    )

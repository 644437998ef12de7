"""A plain multi-layer perceptron: flatten, then Linear -> ReLU per hidden width, then a Linear head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo._checks import positive_int

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear.

    Input: any tensor [B, *] whose trailing dims multiply to ``in_features``
    (e.g. images [B, 1, 28, 28]). Output: logits [B, num_classes].

    Modules: ``flatten`` (nn.Flatten) and ``layers`` (nn.Sequential of
    Linear, ReLU, Linear, ReLU, ..., Linear).
    """

    def __init__(
        self,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
        in_features: int = 784,
    ) -> None:
        super().__init__()
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
            raise ConfigError(f"mlp: hidden must be a sequence of positive ints, got {hidden!r}")
        widths = [positive_int("mlp", f"hidden[{i}]", h) for i, h in enumerate(hidden)]
        num_classes = positive_int("mlp", "num_classes", num_classes)
        in_features = positive_int("mlp", "in_features", in_features)
        self.hidden = tuple(widths)
        self.num_classes = num_classes
        self.in_features = in_features

        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        for width in widths:
            layers.append(nn.Linear(prev, width))
            layers.append(nn.ReLU())
            prev = width
        layers.append(nn.Linear(prev, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, *] with prod(*) == in_features -> logits [B, num_classes]."""
        return self.layers(self.flatten(x))


def mlp(
    hidden: Sequence[int] = (256, 256),
    num_classes: int = 10,
    in_features: int = 784,
) -> MLP:
    """Build an MLP: [B, in_features] (flattened) -> [B, num_classes]."""
    return MLP(hidden=hidden, num_classes=num_classes, in_features=in_features)

"""`trace`: the whole graph analysis in one call — capture the model, then find its spaces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from graphmerge.graph.capture import Traced, capture
from graphmerge.graph.spaces import find_spaces

__all__ = ["trace"]


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: str = "auto",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Traced:
    """Capture `model` as an fx graph with every node's shape, and analyse its spaces.

    Args: as `graphmerge.graph.capture.capture`.

    Returns:
        Traced with `.graph_module`, `.shapes`, `.space_table` and `.spaces`.

    Example:
        >>> import torch, graphmerge as gm
        >>> t = gm.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                                  torch.nn.Linear(8, 2)), torch.randn(3, 4))
        >>> [(s.width, s.frozen) for s in t.spaces]
        [(4, True), (8, False), (2, True)]
    """
    traced = capture(model, example_inputs, frontend=frontend, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
    find_spaces(traced)
    return traced

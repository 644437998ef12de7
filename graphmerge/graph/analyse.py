"""`trace`: the whole graph analysis in one call — capture the model, then find its spaces.

`Analysed` is what it returns: the capture (`graphmerge.graph.capture.Traced`) with the space
table found on it. The capture type knows nothing of spaces; the table lives here, beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from graphmerge.graph.capture import Traced, capture
from graphmerge.graph.spaces import Space, SpaceTable, find_spaces

__all__ = ["Analysed", "trace"]


@dataclass
class Analysed(Traced):
    """A traced model and its space table (`graphmerge.graph.spaces.find_spaces`).

    `dataclasses.replace(analysed, graph_module=...)` keeps the table: the table names nodes
    and parameters, so the new graph module must have the same ones (a float64 copy does).
    """

    space_table: SpaceTable = field(kw_only=True)

    @property
    def spaces(self) -> list[Space]:
        """The spaces of the table; see `graphmerge.graph.spaces.Space`."""
        return self.space_table.spaces

    @classmethod
    def of(cls, traced: Traced) -> Analysed:
        """The capture `traced` (its fields, shared) with the space table found on it."""
        table = find_spaces(traced)
        return cls(**{f.name: getattr(traced, f.name) for f in fields(Traced)},
                   space_table=table)


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: str = "auto",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
) -> Analysed:
    """Capture `model` as an fx graph with every node's shape, and analyse its spaces.

    Args: as `graphmerge.graph.capture.capture`.

    Returns:
        Analysed (a Traced) with `.graph_module`, `.shapes`, `.space_table` and `.spaces`.

    Example:
        >>> import torch, graphmerge as gm
        >>> t = gm.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                                  torch.nn.Linear(8, 2)), torch.randn(3, 4))
        >>> [(s.width, s.frozen) for s in t.spaces]
        [(4, True), (8, False), (2, True)]
    """
    traced = capture(model, example_inputs, frontend=frontend, leaf_modules=leaf_modules,
                     concrete_args=concrete_args)
    return Analysed.of(traced)

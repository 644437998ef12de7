"""The state the merge passes share: inputs, traces, statistics, the plan, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import GraphmergeError
from ..rules import NodeAxis
from ..stats import SpaceStats
from ..trace import Traced


@dataclass
class SpacePlan:
    """How one base space is merged: per model i, M_i [r, d_i] and U_i [d_i, r]."""

    space: int
    widths: list[int]
    width: int
    matcher: str
    merge: list[np.ndarray]
    unmerge: list[np.ndarray]
    mean_correlation: float = float("nan")


@dataclass
class MergeContext:
    """Everything the passes read and write. A pass states what it needs via `require`."""

    models: list[nn.Module]
    traced: list[Traced]
    batches: list[Any]
    n_inputs: int
    method: str = "zip"
    alpha: float = 0.5
    beta: float = 1.0
    heads: str = "auto"
    width: Any = None  # float ratio of the widest model, or {space id: width or ratio}
    progress: bool = True
    # filled by the passes
    reads: dict[int, list[list[NodeAxis]]] | None = None   # select_spaces
    stats: dict[int, SpaceStats] | None = None              # collect_statistics
    agreement: float | None = None                          # collect_statistics
    plans: dict[int, SpacePlan] = field(default_factory=dict)  # match_spaces, attach_heads
    head_mode: str | None = None                            # attach_heads
    merged_state: dict[str, torch.Tensor] | None = None    # merge_parameters
    module: fx.GraphModule | None = None                   # compile_merged

    @property
    def n_models(self) -> int:
        return len(self.models)

    def require(self, pass_name: str, **needs: str) -> None:
        """Raise if a field a pass needs is still empty: `needs` maps field -> producing pass."""
        for name, producer in needs.items():
            if getattr(self, name) is None:
                raise GraphmergeError(f"{pass_name} needs `{name}`: run {producer} first")

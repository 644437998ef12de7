"""The state the merge passes share: inputs, options, and what each pass provides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from graphmerge.calibration import Calibration
from graphmerge.config import MergeConfig
from graphmerge.graph.axes import NodeAxis
from graphmerge.graph.capture import Traced
from graphmerge.graph.rotatable import Rotatable
from graphmerge.match.align import StageAlignment
from graphmerge.match.coverage import Coverage
from graphmerge.match.plans import SpacePlan  # re-exported: defined in the match layer
from graphmerge.match.statistics import SpaceStats, UnitStats
from graphmerge.surgery.refit import Refit

__all__ = ["SpacePlan", "MergeContext"]


@dataclass
class MergeContext:
    """Everything the passes read and write. Fields left None are filled by the pass that
    provides them (see `graphmerge.passes.manager`); a pass that needs one checks it first."""

    models: list[nn.Module]
    calibration: Calibration
    example_inputs: tuple[Any, ...]
    config: MergeConfig = field(default_factory=MergeConfig)
    seconds: dict[str, float] = field(default_factory=dict)
    # provided by the passes
    traced: list[Traced] | None = None                      # trace_models (align_depths)
    checked: bool | None = None                             # check_spaces
    alignments: list[StageAlignment] | None = None          # align_depths
    paired: bool | None = None                              # pair_models
    rotatable: dict[int, Rotatable] | None = None           # fold_norms
    stats: dict[int, SpaceStats] | None = None              # collect_statistics
    reads: dict[int, list[list[NodeAxis]]] | None = None    # collect_statistics
    unit_stats: list[dict[str, UnitStats]] | None = None    # collect_statistics (REPAIR)
    rotations: dict[int, Rotatable] | None = None           # rotate_spaces
    plans: dict[int, SpacePlan] | None = None               # match_spaces, attach_heads
    head_mode: str | None = None                            # attach_heads
    coverage: Coverage | None = None                        # measure_coverage
    merged_state: dict[str, torch.Tensor] | None = None     # merge_parameters
    module: fx.GraphModule | None = None                    # compile_merged
    norms_done: str | None = None                           # correct_norms
    refit: Refit | None = None                              # refit_linears
    cut: str | None = None                                  # split_partial ('' if none)
    match_graph: nx.Graph | None = None                     # build_match_graph

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def n_inputs(self) -> int:
        return len(self.example_inputs)

"""`plan_merge`: what `merge` would do, without a pass over the calibration data.

Traces the models, runs the permutation oracle (with `check=True`), brings shallower models to
the deepest topology at uniform positions (the topology and widths do not depend on where the
units go), and lists the stages, the placements depth alignment will choose among, and every
merged space's widths and merged width. No statistics: cheap enough for a dry run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from graphmerge.calibration import Calibration
from graphmerge.config import MergeConfig
from graphmerge.graph.capture import eval_mode
from graphmerge.inputs import as_inputs
from graphmerge.match.selection import check_width_spaces, head_projections, mergeable, target_width
from graphmerge.merge import check_models
from graphmerge.passes import (
    MergeContext,
    check_spaces,
    expand_uniformly,
    pair_models,
    run_passes,
    trace_models,
)

__all__ = ["MergePlan", "StagePlan", "SpaceRow", "plan_merge", "placements"]


@dataclass
class StagePlan:
    """One stage: its units per model, the reference (deepest) model and, per shallower model,
    how many placements of its units depth alignment chooses among."""

    name: str
    depths: list[int]
    reference: int
    placements: dict[int, int] = field(default_factory=dict)


@dataclass
class SpaceRow:
    """One merged space: each model's width and the merged width; `heads` marks a space of
    attention heads (matched as wholes)."""

    space: int
    widths: list[int]
    width: int
    heads: bool = False


@dataclass
class MergePlan:
    """The plan of a merge: models, stages, merged spaces, frozen spaces."""

    method: str
    align: str
    models: list[dict[str, Any]]
    stages: list[StagePlan]
    spaces: list[SpaceRow]
    frozen: list[tuple[int, int, str]]   # (space, width, why)

    def format(self) -> str:
        lines = [f"plan: merge {len(self.models)} models with {self.method}, depth alignment "
                 f"{self.align}"]
        for i, m in enumerate(self.models):
            lines.append(f"  model {i}: {m['parameters']:,} parameters, {m['nodes']} graph "
                         f"nodes (captured with {m['frontend']}), {m['spaces']} spaces")
        for s in self.stages:
            text = f"  {s.name}: depths {s.depths}"
            for i, n in s.placements.items():
                text += (f"; model {i} placed in model {s.reference}'s {s.depths[s.reference]} "
                         f"units: {n} candidate placement{'s' * (n != 1)}")
            lines.append(text)
        if not self.stages:
            lines.append("  no units of depth: the models are paired node by node")
        lines.append(f"  {len(self.spaces)} merged spaces (widths per model -> merged width):")
        for r in self.spaces:
            lines.append(f"    space {r.space:>3}: {r.widths} -> {r.width}"
                         f"{' (attention heads)' if r.heads else ''}")
        lines.append(f"  {len(self.frozen)} frozen spaces keep model 0's width: "
                     + ", ".join(f"{sid} ({why})" for sid, _, why in self.frozen[:6])
                     + (f", … (+{len(self.frozen) - 6})" if len(self.frozen) > 6 else ""))
        return "\n".join(lines)


def placements(deep: int, shallow: int, method: str) -> int:
    """How many position vectors `align` chooses among for `shallow` units in `deep` units:
    the first unit is pinned; LMA also pins the last; uniform has one."""
    if shallow in (1, deep) or method == "uniform":
        return 1
    if method == "lma":
        return math.comb(deep - 2, shallow - 2)
    return math.comb(deep - 1, shallow - 1)


def plan_merge(models: Sequence[nn.Module], example_inputs: Any,
               config: MergeConfig | Mapping[str, Any] | None = None,
               **options: Any) -> MergePlan:
    """The plan of `merge(models, ..., **options)`, from the example inputs alone.

    Raises what `merge` raises before its statistics pass: ConfigError (options),
    TracingError, SpaceCheckError (the oracle), MismatchError (models that do not pair).

    Example:
        >>> import torch, graphmerge as gm
        >>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        >>> b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> plan = plan_merge([a, b], torch.randn(8, 4), heads="average")
        >>> [(r.widths, r.width) for r in plan.spaces]
        [([16, 8], 16)]
    """
    cfg = MergeConfig.of(config, **options)
    models = check_models(models)
    inputs = as_inputs(example_inputs)
    ctx = MergeContext(models, Calibration([inputs], len(inputs)), inputs, cfg)
    with ExitStack() as stack:
        for m in models:
            stack.enter_context(eval_mode(m))
        run_passes(ctx, [trace_models, check_spaces])
        described = [{"parameters": sum(p.numel() for p in m.parameters()),
                      "nodes": len(t.graph.nodes), "frontend": t.frontend,
                      "spaces": len(t.space_table.spaces)} for m, t in zip(models, ctx.traced)]
        run_passes(ctx, [expand_uniformly, pair_models])
    stages = [StagePlan(a.name, list(a.depths), a.reference,
                        {i: placements(a.depths[a.reference], d, cfg.align)
                         for i, d in enumerate(a.depths) if 0 < d < a.depths[a.reference]})
              for a in ctx.alignments]
    tables = [t.space_table for t in ctx.traced]
    heads = head_projections(tables[0], cfg.attention)
    merged = [s.id for s in mergeable(tables[0])]
    check_width_spaces(cfg.width, set(merged), set(heads))
    rows = []
    for sid in sorted([*merged, *heads]):
        widths = [t[sid].width for t in tables]
        rows.append(SpaceRow(sid, widths, target_width(cfg.width, sid, widths) or max(widths),
                             sid in heads))
    frozen = [(s.id, s.width, s.why or "") for s in tables[0] if s.frozen and s.derived is None]
    return MergePlan(cfg.method, cfg.align, described, stages, rows, frozen)

"""Pass `correct_norms`: renormalise the merged module on the calibration data — REPAIR
(`norms="repair"`, the default: `graphmerge.surgery.repair`), or BatchNorm running statistics
recomputed (`norms="reset"`, as ZipIt and HET do)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from graphmerge.graph.capture import set_eval
from graphmerge.inputs import split_batch
from graphmerge.match.statistics import unit_sums
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.repair import (
    RepairPoint,
    by_level,
    moments,
    repair,
    repair_points,
    targets,
)


def reset_batch_norms(module: nn.Module, batches: Iterable[Any], n_inputs: int,
                progress: bool = True) -> int:
    """Cumulative-average BatchNorm statistics over `batches`; returns the number of norms reset.

    Only the norms run in train mode; everything else (dropout) stays in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    set_eval(module)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    with torch.no_grad():
        for batch in tqdm(batches, desc="reset norms", unit="batch", disable=not progress,
                          leave=False):
            module(*split_batch(batch, n_inputs))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    set_eval(module)
    return len(norms)


@merge_pass(needs=("module",), provides=("norms_done",))
def correct_norms(ctx: MergeContext) -> None:
    """Apply the configured norm correction to the merged module."""
    if ctx.config.norms == "reset":
        reset_batch_norms(ctx.module, ctx.batches, ctx.n_inputs, progress=ctx.config.progress)
    elif ctx.config.norms == "repair":
        repair_module(ctx)
    ctx.norms_done = ctx.config.norms


def repair_module(ctx: MergeContext) -> int:
    """REPAIR every point of the merged spaces, level by level; returns the number of points."""
    plans = {sid: p for sid, p in ctx.plans.items()
             if ctx.traced[0].space_table[sid].derived is None}
    points = repair_points(ctx.traced[0], set(plans))
    if not points:
        return 0
    progress = ctx.config.progress
    wanted = {p.node: p.dim for p in points}
    per_model = [unit_sums(t.graph_module, wanted, ctx.batches, ctx.n_inputs, progress=progress,
                           desc=f"REPAIR targets, model {i}") for i, t in enumerate(ctx.traced)]
    repair_levels(ctx, points, lambda p: p.measure, lambda p: targets(
        [np.asarray(m) for m in plans[p.space].merge],
        [moments(*sums[p.node]) for sums in per_model]))
    return len(points)


def repair_levels(ctx: MergeContext, points: list[RepairPoint],
                  measured_at: Callable[[RepairPoint], str],
                  target: Callable[[RepairPoint], tuple[np.ndarray, np.ndarray]]) -> None:
    """Correct `points` of the merged module level by level: one calibration pass per level
    measures its points (at node `measured_at(p)`) after the levels above were corrected."""
    for level in by_level(points):
        nodes = {measured_at(p): p.dim for p in level}
        now = unit_sums(ctx.module, nodes, ctx.batches, ctx.n_inputs,
                        progress=ctx.config.progress, desc="REPAIR")
        for p in level:
            repair(ctx.module, p, moments(*now[measured_at(p)]), target(p))

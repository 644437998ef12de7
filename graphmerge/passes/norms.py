"""Pass `correct_norms`: renormalise the merged module on the calibration data — REPAIR
(`norms="repair"`, the default: `graphmerge.surgery.repair`), or BatchNorm running statistics
recomputed (`norms="reset"`, as ZipIt and HET do)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from graphmerge.calibration import all_reduce, distributed, with_progress
from graphmerge.graph.capture import set_eval
from graphmerge.graph.lockstep import OverBudget, nbytes, run_lockstep
from graphmerge.match.statistics import UnitStats, unit_sums
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.repair import (
    RepairPoint,
    by_level,
    repair,
    repair_points,
    targets,
)

log = logging.getLogger(__name__)


def reset_batch_norms(module: nn.Module, calibration: Iterable[tuple[Any, ...]],
                      progress: bool = True) -> int:
    """Cumulative-average BatchNorm statistics over the calibration data (averaged over the
    processes under torch.distributed); returns the number of norms reset.

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
        for _, inputs in with_progress(calibration, "reset norms", progress):
            module(*inputs)
        for m in norms if distributed()[1] > 1 else ():  # ranks' means → the mean of all
            n = m.num_batches_tracked.to(m.running_mean.dtype)
            mean, var, count = m.running_mean * n, m.running_var * n, n.reshape(1).clone()
            all_reduce(mean, var, count)
            m.running_mean.copy_(mean / count)
            m.running_var.copy_(var / count)
            m.num_batches_tracked.fill_(int(count.item()))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    set_eval(module)
    return len(norms)


@merge_pass(needs=("module", "unit_stats"), provides=("norms_done",))
def correct_norms(ctx: MergeContext) -> None:
    """Apply the configured norm correction to the merged module."""
    if ctx.config.norms == "reset":
        reset_batch_norms(ctx.module, ctx.calibration, progress=ctx.config.progress)
    elif ctx.config.norms == "repair":
        repair_module(ctx)
    ctx.norms_done = ctx.config.norms


def repair_module(ctx: MergeContext) -> int:
    """REPAIR every point of the merged spaces; returns the number of points."""
    plans = {sid: p for sid, p in ctx.plans.items()
             if ctx.traced[0].space_table[sid].derived is None}
    points = repair_points(ctx.traced[0], set(plans))
    if points:
        repair_in_order(ctx, points, lambda p: p.measure, lambda p: targets(
            [np.asarray(m) for m in plans[p.space].merge],
            [own[p.node].moments() for own in ctx.unit_stats]))
    return len(points)


#: activations held for REPAIR's single pass when max_memory is not set (bytes)
ACTIVATION_BUDGET = 2 << 30


def repair_in_order(ctx: MergeContext, points: list[RepairPoint],
                    measured_at: Callable[[RepairPoint], str],
                    target: Callable[[RepairPoint], tuple[np.ndarray, np.ndarray]]) -> None:
    """Correct `points` of the merged module so that each is measured (at node
    `measured_at(p)`) after every point above it was corrected.

    The module runs node by node over all calibration batches at once, holding their live
    activations: one forward pass. When they would exceed `max_memory` (default
    `ACTIVATION_BUDGET`), and under torch.distributed, one pass per level of points instead
    (`by_level`)."""
    budget = ctx.config.max_memory or ACTIVATION_BUDGET
    if distributed()[1] == 1:
        try:
            return _one_pass(ctx.module, points, measured_at, target, ctx.calibration, budget,
                             ctx.config.progress)
        except OverBudget:
            log.info("REPAIR: the calibration activations exceed %d bytes; one pass per "
                     "level", budget)
    for level in by_level(points):
        nodes = {measured_at(p): p.dim for p in level}
        now = unit_sums(ctx.module, nodes, ctx.calibration, progress=ctx.config.progress,
                        desc="REPAIR")
        for p in level:
            repair(ctx.module, p, now[measured_at(p)].moments(), target(p))


def _one_pass(module: fx.GraphModule, points: list[RepairPoint],
              measured_at: Callable[[RepairPoint], str],
              target: Callable[[RepairPoint], tuple[np.ndarray, np.ndarray]],
              calibration: Iterable[tuple[Any, ...]], budget: int, progress: bool) -> None:
    at: dict[str, list[RepairPoint]] = {}
    for p in points:
        at.setdefault(measured_at(p), []).append(p)
    batches, held = [], 0
    for inputs in calibration:
        batches.append(inputs)
        held += nbytes(inputs)
        if held > budget:
            raise OverBudget

    def visit(n: fx.Node, values: list[Any]) -> bool:
        bar.update(1)
        for p in at.get(n.name, ()):
            sums = UnitStats()
            for v in values:
                sums.add(v, p.dim)
            repair(module, p, sums.moments(), target(p))
        return any(p.kind == "fold" for p in at.get(n.name, ()))  # it reads the new weights

    nodes = sum(1 for n in module.graph.nodes if n.op != "output")
    with tqdm(total=nodes, desc="REPAIR (all batches at once)", unit="node",
              disable=not progress, leave=False) as bar:
        run_lockstep([set_eval(module)] * len(batches), batches, visit, max_bytes=budget,
                     what=lambda b: f"the merged module on calibration batch {b}")

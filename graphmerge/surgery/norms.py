"""Norm corrections: after the merge, the merged module is renormalised on the calibration data
(`norms=` in `MergeConfig`), each correction registered in `CORRECTIONS`:

* "repair" (the default): REPAIR (`graphmerge.surgery.repair`), each merged unit's mean and
  std where it enters a nonlinearity or a norm set to its members' (merge-weighted), from the
  per-unit statistics the statistics pass collected in the input models;
* "reset": BatchNorm running statistics recomputed on the calibration data (as ZipIt and HET
  do);
* "none": the merged statistics are kept.

A correction acts twice: `apply` on the merged module (pass `correct_norms`), and
`apply_tails` on a partial merge (`partial=`, pass `split_partial`), whose layers after the cut
are each model's own, now fed by the merged trunk. What it needs from the statistics pass is
`needs_unit_stats`: per-unit sums of the input models at every REPAIR point (`unit_points`).

How to add a norm correction: write its two functions here, `f(inputs: NormInputs) -> None`
for the merged module and `g(inputs: NormInputs, names, trunk) -> None` for a partial merge's
tails (`NormCorrection.apply_tails` says what the arguments are), and register
`NormCorrection("name", needs_unit_stats, f, g)` in `CORRECTIONS`. `norms="name"` is then a
valid option (`graphmerge.config.NORM_MODES` is the registry's keys) and both passes run it;
no other file changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from graphmerge.calibration import all_reduce, distributed, with_progress
from graphmerge.errors import ConfigError
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.lockstep import OverBudget, nbytes, run_lockstep
from graphmerge.match.plans import SpacePlan
from graphmerge.match.statistics import UnitStats, unit_sums
from graphmerge.surgery.repair import RepairPoint, by_level, repair, repair_points, targets

__all__ = ["NormInputs", "NormCorrection", "CORRECTIONS", "get_correction", "ACTIVATION_BUDGET",
           "reset_batch_norms", "repair_module", "repair_tails", "repair_in_order"]

log = logging.getLogger(__name__)

#: activations held for REPAIR's single pass when max_memory is not set (bytes)
ACTIVATION_BUDGET = 2 << 30

#: a point's statistics: per-unit mean and std
Moments = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class NormInputs:
    """What a norm correction reads: the module to correct (changed in place), every model's
    trace, the plans of the merged spaces, per model the per-unit statistics collected at
    `unit_points` ({node: UnitStats}, empty without `needs_unit_stats`), the calibration
    batches, the bytes of activations a single pass may hold (`max_memory`, None:
    `ACTIVATION_BUDGET`), and whether to show progress bars."""

    module: fx.GraphModule
    traced: Sequence[Traced]
    plans: Mapping[int, SpacePlan]
    unit_stats: Sequence[Mapping[str, UnitStats]]
    calibration: Iterable[tuple[Any, ...]]
    max_memory: int | None = None
    progress: bool = True

    @property
    def budget(self) -> int:
        return self.max_memory or ACTIVATION_BUDGET


@dataclass(frozen=True)
class NormCorrection:
    """A registered norm correction.

    `apply(inputs)` corrects the merged module `inputs.module`. `apply_tails(inputs, names,
    trunk)` corrects a partial merge `inputs.module` after `apply` corrected its merged
    module: `names[i]` maps model i's node names to their names in the partial module (its
    layers after the cut), `trunk` holds the nodes of model 0's graph up to the cut (merged).
    `needs_unit_stats`: the statistics pass collects per-unit sums at `unit_points`."""

    name: str
    needs_unit_stats: bool
    apply: Callable[[NormInputs], None]
    apply_tails: Callable[[NormInputs, Sequence[Mapping[str, str]], set[str]], None]

    def unit_points(self, traced: Traced) -> dict[str, int]:
        """{node: unit axis} whose per-unit sums the correction reads in every model: every
        REPAIR point of every space (a partial merge's tails too); none if it reads none."""
        if not self.needs_unit_stats:
            return {}
        return {p.node: p.dim for p in repair_points(traced, {s.id for s in traced.space_table})}


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


def repair_module(inputs: NormInputs) -> int:
    """REPAIR every point of the merged spaces; returns the number of points."""
    table = inputs.traced[0].space_table
    plans = {sid: p for sid, p in inputs.plans.items() if table[sid].derived is None}
    points = repair_points(inputs.traced[0], set(plans))
    if points:
        repair_in_order(inputs.module, points, lambda p: p.measure, lambda p: targets(
            [np.asarray(m) for m in plans[p.space].merge],
            [own[p.node].moments() for own in inputs.unit_stats]),
            inputs.calibration, budget=inputs.budget, progress=inputs.progress)
    return len(points)


def repair_tails(inputs: NormInputs, names: Sequence[Mapping[str, str]], trunk: set[str]
                 ) -> None:
    """REPAIR in each model's own layers of a partial merge: its units' statistics there are
    set back to the model's own (its merge matrix after the cut is the identity)."""
    for i, (traced, where) in enumerate(zip(inputs.traced, names)):
        points = [replace(p, tensors={role: f"model{i}.{t}" for role, t in p.tensors.items()})
                  for p in repair_points(traced, {s.id for s in traced.space_table})
                  if p.node not in trunk and p.measure in where]
        if not points:
            continue
        own = inputs.unit_stats[i]
        repair_in_order(inputs.module, points, lambda p: where[p.measure],
                        lambda p: own[p.node].moments(), inputs.calibration,
                        budget=inputs.budget, progress=inputs.progress)


def repair_in_order(module: fx.GraphModule, points: list[RepairPoint],
                    measured_at: Callable[[RepairPoint], str],
                    target: Callable[[RepairPoint], Moments],
                    calibration: Iterable[tuple[Any, ...]], *,
                    budget: int = ACTIVATION_BUDGET, progress: bool = True) -> None:
    """Correct `points` of `module` in place so that each is measured (at node
    `measured_at(p)`) after every point above it was corrected, toward `target(p)`.

    The module runs node by node over all calibration batches at once, holding their live
    activations: one forward pass. When they would exceed `budget` bytes, and under
    torch.distributed, one pass per level of points instead (`by_level`)."""
    if distributed()[1] == 1:
        try:
            return _one_pass(module, points, measured_at, target, calibration, budget,
                             progress)
        except OverBudget:
            log.info("REPAIR: the calibration activations exceed %d bytes; one pass per "
                     "level", budget)
    for level in by_level(points):
        nodes = {measured_at(p): p.dim for p in level}
        now = unit_sums(module, nodes, calibration, progress=progress, desc="REPAIR")
        for p in level:
            repair(module, p, now[measured_at(p)].moments(), target(p))


def _one_pass(module: fx.GraphModule, points: list[RepairPoint],
              measured_at: Callable[[RepairPoint], str],
              target: Callable[[RepairPoint], Moments],
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


def _repair(inputs: NormInputs) -> None:
    repair_module(inputs)


def _reset(inputs: NormInputs) -> None:
    reset_batch_norms(inputs.module, inputs.calibration, progress=inputs.progress)


def _reset_tails(inputs: NormInputs, names: Sequence[Mapping[str, str]], trunk: set[str]
                 ) -> None:
    """Every BatchNorm of the partial module, the models' own ones included."""
    _reset(inputs)


def _keep(inputs: NormInputs, *tails: Any) -> None:
    """Nothing: the merged statistics are kept."""


CORRECTIONS: dict[str, NormCorrection] = {c.name: c for c in (
    NormCorrection("repair", True, _repair, repair_tails),
    NormCorrection("reset", False, _reset, _reset_tails),
    NormCorrection("none", False, _keep, _keep),
)}


def get_correction(name: str) -> NormCorrection:
    """The norm correction registered as `name`; ConfigError listing the valid names
    otherwise."""
    try:
        return CORRECTIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown norms {name!r}; valid: {', '.join(CORRECTIONS)}") from None

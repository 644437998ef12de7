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
from torch.nn import functional as F
from tqdm.auto import tqdm

from graphmerge.calibration import all_reduce, distributed, with_progress
from graphmerge.errors import ConfigError
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import has_statistics, norm_eps, tensor_args
from graphmerge.graph.lockstep import OverBudget, nbytes, run_lockstep
from graphmerge.graph.tensors import get_tensor
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

    Only the norms run in train mode (batch statistics, running statistics updated);
    everything else (dropout) stays in eval mode. Batch norms that are modules and those that
    are calls in a graph (`F.batch_norm`, an exported graph's aten batch norm, whose running
    statistics are the graph's buffers) are reset alike, in one pass.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    calls = _graph_batch_norms(module) if isinstance(module, fx.GraphModule) else {}
    if not norms and not calls:
        return 0
    set_eval(module)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    for norm in calls.values():
        norm.mean.zero_()
        norm.var.fill_(1.0)
    graph = _TrainNorms(module, calls) if calls else None
    batches = 0
    with torch.no_grad():
        for _, inputs in with_progress(calibration, "reset norms", progress):
            if graph is None:
                module(*inputs)
            else:  # the graph's norms: a cumulative average too
                graph.run(*inputs, momentum=1.0 / (batches + 1))
            batches += 1
        if distributed()[1] > 1:  # ranks' means → the mean of all
            for m in norms:
                count = _mean_over_ranks(m.running_mean, m.running_var,
                                         int(m.num_batches_tracked))
                m.num_batches_tracked.fill_(count)
            for norm in calls.values():
                _mean_over_ranks(norm.mean, norm.var, batches)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    set_eval(module)
    return len(norms) + len(calls)


def _mean_over_ranks(mean: torch.Tensor, var: torch.Tensor, batches: int) -> int:
    """Running statistics of this rank's `batches` averaged with every other rank's, in place;
    returns the number of batches of all ranks."""
    count = torch.tensor([float(batches)], dtype=mean.dtype, device=mean.device)
    total_mean, total_var = mean * batches, var * batches
    all_reduce(total_mean, total_var, count)
    mean.copy_(total_mean / count)
    var.copy_(total_var / count)
    return int(count.item())


@dataclass(frozen=True)
class _GraphNorm:
    """A batch-norm call of a graph: its tensors (the graph's buffers and parameters), its
    epsilon, and whether it returns aten's (out, mean, rstd) tuple."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    returns_tuple: bool


def _graph_batch_norms(gm: fx.GraphModule) -> dict[str, _GraphNorm]:
    """Batch-norm calls of the graph whose running statistics are its buffers, by node name."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" or not has_statistics(n):
            continue
        names = tensor_args(n)
        if {"running_mean", "running_var"} <= names.keys():
            weight, bias = (get_tensor(gm, names[r]) if r in names else None
                            for r in ("weight", "bias"))
            out[n.name] = _GraphNorm(
                get_tensor(gm, names["running_mean"]), get_tensor(gm, names["running_var"]),
                weight, bias, norm_eps(n, gm),
                isinstance(n.target, torch._ops.OpOverload) and len(n.target._schema.returns) > 1)
    return out


class _TrainNorms(fx.Interpreter):
    """Runs a graph with its batch-norm calls in train mode: each normalises with its batch's
    statistics and moves its running statistics by `momentum` (1/(k+1) at batch k gives the
    cumulative average), as a BatchNorm module in train mode with momentum=None does."""

    def __init__(self, gm: fx.GraphModule, calls: Mapping[str, _GraphNorm]) -> None:
        super().__init__(gm)
        self.calls = calls
        self.momentum = 1.0

    def run(self, *inputs: Any, momentum: float = 1.0) -> Any:  # type: ignore[override]
        self.momentum = momentum
        return super().run(*inputs)

    def run_node(self, n: fx.Node) -> Any:
        norm = self.calls.get(n.name)
        if norm is None:
            return super().run_node(n)
        x = self.env[n.args[0]]
        out = F.batch_norm(x, norm.mean, norm.var, norm.weight, norm.bias, True, self.momentum,
                           norm.eps)
        return (out, x.new_empty(0), x.new_empty(0)) if norm.returns_tuple else out


def repair_module(inputs: NormInputs) -> int:
    """REPAIR every point of the merged spaces; returns the number of points."""
    table = inputs.traced[0].space_table
    plans = {sid: p for sid, p in inputs.plans.items() if table[sid].derived is None}
    points = repair_points(inputs.traced[0], set(plans))
    if points:
        repair_in_order(inputs.module, points, lambda p: p.measure, lambda p: targets(
            plans[p.space], [own[p.node].moments() for own in inputs.unit_stats]),
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

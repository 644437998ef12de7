"""Pass `align_depths`: models of one family but different depths are brought to one topology.

Stages and trunk come from the graph (`graphmerge.graph.stages`); the reference graph is the
model with the most units, grown where another model is deeper in a stage
(`graphmerge.surgery.splice`). One pass over the calibration data measures the CKA of every
(reference unit, shallow unit) pair (`graphmerge.match.cka`); dynamic programming places the
shallow units (`graphmerge.match.align`); each shallower model becomes the reference's graph
carrying its tensors, with identity units in the free positions
(`graphmerge.surgery.deepen.expand`), and is traced again. Models of equal depths pass unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from graphmerge.calibration import with_progress
from graphmerge.errors import MismatchError
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import tensor_args
from graphmerge.graph.stages import (
    Stage,
    aligned_stages,
    check_trunks,
    find_stages,
    trunk,
)
from graphmerge.match.align import StageAlignment, align
from graphmerge.match.cka import CKAAccumulator
from graphmerge.match.statistics import feature_module
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.deepen import expand, topology
from graphmerge.surgery.splice import Insertion, splice

log = logging.getLogger(__name__)


@merge_pass(needs=("traced",), provides=("alignments",),
            writes=("models", "traced"))
def align_depths(ctx: MergeContext) -> None:
    """Align every shallower stage to the deepest by CKA and expand it (replaces `ctx.models`
    and `ctx.traced` of the expanded models)."""
    _align(ctx, measure=True)


@merge_pass(needs=("traced",), provides=("alignments",),
            writes=("models", "traced"))
def expand_uniformly(ctx: MergeContext) -> None:
    """`align_depths` without a pass over the data: shallow units at uniform positions (for
    plans and dry runs: the expanded topology and widths do not depend on the positions)."""
    _align(ctx, measure=False)


def _align(ctx: MergeContext, measure: bool) -> None:
    """Stages of every model, the deepest graph, the positions of the shallow units (by CKA
    when `measure`, else uniform), then every shallower model expanded to that graph."""
    models, traced = ctx.models, ctx.traced
    keys = [topology(t) for t in traced]
    if all(k == keys[0] for k in keys):  # one topology (widths may differ): nothing to align
        stages = find_stages(traced[0])
        ctx.alignments = [StageAlignment(s, st.name, [st.depth] * len(models), 0,
                                         [list(range(st.depth))] * len(models),
                                         [None] * len(models))
                          for s, st in enumerate(stages)]
        return
    n = len(models)

    def check(stages: list[list[Stage]], base: int) -> None:
        for i in range(n):
            try:
                check_trunks(traced[base], stages[base], traced[i], stages[i])
            except MismatchError as e:
                raise MismatchError(f"model {i} cannot be aligned to model {base}: {e}") from e

    stages, base, mode = aligned_stages(traced, check)
    by = [{st.anchor: st for st in stages[i]} for i in range(n)]
    anchors = sorted({a for b in by for a in b})
    depth = {a: [b[a].depth if a in b else 0 for b in by] for a in anchors}
    deepest = {a: max(range(n), key=lambda i: depth[a][i]) for a in anchors}
    ref, ref_stages = _deepest_graph(ctx, stages, base, mode, by, depth, deepest)
    if [(st.anchor, st.depth) for st in ref_stages] != [(a, max(depth[a])) for a in anchors]:
        raise MismatchError("could not build one graph as deep as the deepest model in every "
                            "stage: the models' stages do not line up")
    alignments = [StageAlignment(s, st.name, depth[st.anchor], deepest[st.anchor],
                                 [list(range(d)) for d in depth[st.anchor]], [None] * n)
                  for s, st in enumerate(ref_stages)]
    ctx.alignments = alignments
    todo = [(a, i) for a in alignments for i, d in enumerate(a.depths)
            if 0 < d < a.depths[a.reference]]
    if not measure:
        for a, i in todo:
            a.positions[i] = align(np.zeros((a.depths[a.reference], a.depths[i])), "uniform")
        todo = []
    units = {(i, a.stage): by[i][ref_stages[a.stage].anchor].units
             for a in alignments for i in range(n) if a.depths[i]}
    _measure_cka(ctx, traced, alignments, units, todo)
    _expand_models(ctx, models, traced, stages, ref, ref_stages, alignments)


def _measure_cka(ctx: MergeContext, traced: list[Traced], alignments: list[StageAlignment],
                 units: dict, todo: list[tuple[StageAlignment, int]]) -> None:
    """One pass over the calibration data: the CKA of the outputs (what a dense layer adds:
    `Unit.measured`) of every unit of the stages to align (`todo`: alignment, model) against
    the reference's, and the positions chosen."""
    wanted: dict[int, set[str]] = {}
    for a, i in todo:
        for j in (i, a.reference):
            wanted.setdefault(j, set()).update(u.measured for u in units[j, a.stage])
    runners = {i: set_eval(feature_module(traced[i].graph_module, sorted(names)))
               for i, names in wanted.items()}
    acc = {(a.stage, i): CKAAccumulator(a.depths[a.reference], a.depths[i]) for a, i in todo}
    if acc:
        with torch.no_grad():
            for _, inputs in with_progress(ctx.calibration, "unit CKA", ctx.config.progress):
                feats = {i: run(*inputs)[1] for i, run in runners.items()}
                for (s, i), cka in acc.items():
                    r = alignments[s].reference
                    cka.update([feats[r][u.measured] for u in units[r, s]],
                               [feats[i][u.measured] for u in units[i, s]])
    for (s, i), cka in acc.items():
        cka.all_reduce()
        a = alignments[s]
        a.cka[i] = cka.result()
        a.positions[i] = align(a.cka[i], ctx.config.align)


def _expand_models(ctx: MergeContext, models: list[nn.Module], traced: list[Traced],
                   stages: list[list[Stage]], ref: Traced, ref_stages: list[Stage],
                   alignments: list[StageAlignment]) -> None:
    """Expand every model whose topology is not the deepest one's to it, at the chosen
    positions, and trace it again; the post-norm fit errors and inserted nodes are recorded."""
    ctx.models, ctx.traced = list(models), list(traced)
    calibration = ctx.calibration.unsharded()  # read only by post-norm fits
    target = topology(ref)
    for i in range(len(models)):
        if topology(traced[i]) == target:
            continue
        positions = {a.stage: a.positions[i] for a in alignments}
        ctx.models[i], fit, inserted = expand(models[i], traced[i], stages[i], ref, ref_stages,
                                              positions, ctx.example_inputs,
                                              calibration=calibration)
        for a in alignments:
            a.fit_errors.update({k: v for k, v in fit.items()
                                 if k in _norm_owners(ref, ref_stages[a.stage])})
            a.inserted.update(m for u in ref_stages[a.stage].units for m in u.nodes
                              if m in set(inserted))
        ctx.traced[i] = trace(ctx.models[i], ctx.example_inputs, frontend=ctx.config.frontend,
                              leaf_modules=ctx.config.leaf_modules)
        log.info("model %d expanded to the deepest topology: %s", i,
                 {a.name: a.positions[i] for a in alignments})


def _deepest_graph(ctx: MergeContext, stages: list[list[Stage]], base: int, mode: dict,
                   by: list[dict], depth: dict, deepest: dict) -> tuple[Traced, list[Stage]]:
    """The graph every model is expanded to: model `base` (the one with the most units) where
    it is the deepest in every stage; else its graph with units of the deepest model spliced
    into each stage where it is shallower (`graphmerge.surgery.splice`)."""
    traced = ctx.traced
    insertions = []
    for a, d in deepest.items():
        extra = depth[a][d] - depth[a][base]
        if not extra:
            continue
        if by[d][a].units[0].kind == "concat":
            raise MismatchError(
                f"the {by[d][a].name} of model {d} is a dense block (each unit concatenates "
                f"its output onto its input) deeper than model {base}'s, which has the most "
                f"units: growing a dense block inside another model's graph is not supported; "
                f"merge models one of which is the deepest in every stage")
        if a in by[base]:  # more of its own units: the widths are the base's
            trunk_map = {x.name: x.name for x in trunk(traced[base], stages[base])}
            insertions.append(Insertion(by[base][a].units[-1].output, traced[base],
                                        by[base][a].units[0], extra, trunk_map))
            continue
        trunk_map = {x.name: y.name for x, y in zip(trunk(traced[d], stages[d]),
                                                   trunk(traced[base], stages[base]))}
        donor = by[d][a]
        after = trunk_map.get(donor.input)
        if after is None:
            raise MismatchError(f"the {donor.name} of model {d} follows another stage directly; "
                                f"model {base} has no place to grow it")
        # the donor's units read and (plain units) write the stream at the base's width
        table, unit = traced[d].space_table, donor.units[0]
        widths = {table.node_axes[node][dim]: w
                  for node in (unit.input, unit.output) if node in table.node_axes
                  for dim, w in enumerate(traced[base].shapes[after])
                  if dim in table.node_axes[node] and (node == unit.input or unit.kind == "layer")}
        insertions.append(Insertion(after, traced[d], unit, extra, trunk_map, widths))
    if not insertions:
        return traced[base], stages[base]
    grown = trace(splice(traced[base], insertions), ctx.example_inputs,
                  frontend=ctx.config.frontend, leaf_modules=ctx.config.leaf_modules)
    log.info("no model is the deepest in every stage: model %d grown by %d units", base,
             sum(i.count for i in insertions))
    return grown, find_stages(grown, **mode)


def _norm_owners(traced: Traced, stage: Stage) -> set[str]:
    """Names of the norms inside a stage's units (how fit errors are keyed)."""
    out = set()
    for u in stage.units:
        for name in u.nodes:
            w = tensor_args(traced.node(name)).get("weight")
            if w:
                out.add(w.rpartition(".")[0])
    return out

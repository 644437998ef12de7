"""Pass `align_depths`: models of one family but different depths are brought to one topology.

For each stage (`graphmerge.graph.stages`) the deepest model is the reference. One pass over
the calibration data measures the CKA of every (reference unit, shallow unit) pair
(`graphmerge.match.cka`); dynamic programming places the shallow units (`graphmerge.match.align`);
the shallow model is expanded with exact identity units (`graphmerge.surgery.deepen.expand`) and
traced again. Models of equal depths pass unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from graphmerge.errors import MismatchError
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import set_eval
from graphmerge.graph.stages import find_stages
from graphmerge.inputs import split_batch
from graphmerge.match.align import StageAlignment, align
from graphmerge.match.cka import CKAAccumulator
from graphmerge.match.statistics import feature_module
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.deepen import expand

log = logging.getLogger(__name__)


@merge_pass(needs=("traced",), provides=("alignments",))
def align_depths(ctx: MergeContext) -> None:
    """Align every shallower stage to the deepest by CKA and expand it (replaces `ctx.models`
    and `ctx.traced` of the expanded models)."""
    models, traced = ctx.models, ctx.traced
    stages = [find_stages(t) for t in traced]
    counts = [len(s) for s in stages]
    if len(set(counts)) > 1:
        i = next(i for i, c in enumerate(counts) if c != counts[0])
        raise MismatchError(f"model {i} has {counts[i]} stages, model 0 has {counts[0]}: models "
                            f"of different depth must have the same stages")
    alignments = []
    for s in range(counts[0]):
        depths = [st[s].depth for st in stages]
        ref = int(np.argmax(depths))
        alignments.append(StageAlignment(s, stages[ref][s].container, depths, ref,
                                         [list(range(d)) for d in depths],
                                         [None] * len(models)))
    ctx.alignments = alignments
    todo = [(a, i) for a in alignments for i, d in enumerate(a.depths)
            if d < a.depths[a.reference]]
    if not todo:
        return
    # one pass over the calibration data: outputs of every unit of the stages to align
    wanted = {i: sorted({u.output for a, j in todo if j == i or a.reference == i
                         for u in stages[i][a.stage].units}) for i in range(len(models))}
    runners = {i: set_eval(feature_module(traced[i].graph_module, names))
               for i, names in wanted.items() if names}
    acc = {(a.stage, i): CKAAccumulator(a.depths[a.reference], a.depths[i]) for a, i in todo}
    with torch.no_grad():
        for batch in tqdm(ctx.batches, desc="unit CKA", disable=not ctx.config.progress,
                          leave=False):
            inputs = split_batch(batch, ctx.n_inputs)
            feats = {i: run(*inputs)[1] for i, run in runners.items()}
            for (s, i), cka in acc.items():
                a = alignments[s]
                ref_units = stages[a.reference][s].units
                cka.update([feats[a.reference][u.output] for u in ref_units],
                           [feats[i][u.output] for u in stages[i][s].units])
    plans: dict[int, dict[int, tuple]] = {}
    for (s, i), cka in acc.items():
        a = alignments[s]
        a.cka[i] = cka.result()
        a.positions[i] = align(a.cka[i], ctx.config.align)
        plans.setdefault(i, {})[s] = (a.positions[i], a.depths[a.reference],
                                      models[a.reference], traced[a.reference],
                                      stages[a.reference][s])
    ctx.models, ctx.traced = list(models), list(traced)
    calibration = [split_batch(b, ctx.n_inputs) for b in ctx.batches]
    for i, plan in plans.items():
        ctx.models[i], fit = expand(models[i], traced[i], stages[i], plan, ctx.example_inputs,
                                    calibration=calibration)
        for s in plan:
            alignments[s].fit_errors.update({k: v for k, v in fit.items()
                                             if k.startswith(alignments[s].container)})
        ctx.traced[i] = trace(ctx.models[i], ctx.example_inputs, frontend=ctx.config.frontend,
                              leaf_modules=ctx.config.leaf_modules)
        log.info("model %d expanded to the deepest topology: %s", i,
                 {alignments[s].container: plan[s][0] for s in plan})

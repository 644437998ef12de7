"""Pass `align_depths`: models of one family but different depths are brought to one topology.

Stages and trunk come from the graph (`graphmerge.graph.stages`); the model that is deepest in
every stage is the reference. One pass over the calibration data measures the CKA of every
(reference unit, shallow unit) pair (`graphmerge.match.cka`); dynamic programming places the
shallow units (`graphmerge.match.align`); each shallower model becomes the reference's graph
carrying its tensors, with identity units in the free positions
(`graphmerge.surgery.deepen.expand`), and is traced again. Models of equal depths pass unchanged.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from graphmerge.errors import MismatchError
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import tensor_args
from graphmerge.graph.stages import (
    Stage,
    aligned_stages,
    corresponding_stages,
    find_stages,
)
from graphmerge.inputs import split_batch
from graphmerge.match.align import StageAlignment, align
from graphmerge.match.cka import CKAAccumulator
from graphmerge.match.statistics import feature_module
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.deepen import expand, plan_depths, topology

log = logging.getLogger(__name__)


@merge_pass(needs=("traced",), provides=("alignments",))
def align_depths(ctx: MergeContext) -> None:
    """Align every shallower stage to the deepest by CKA and expand it (replaces `ctx.models`
    and `ctx.traced` of the expanded models)."""
    models, traced = ctx.models, ctx.traced
    keys = [topology(t) for t in traced]
    if all(k == keys[0] for k in keys):  # one topology (widths may differ): nothing to align
        stages = find_stages(traced[0])
        ctx.alignments = [StageAlignment(s, st.name, [st.depth] * len(models), 0,
                                         [list(range(st.depth))] * len(models),
                                         [None] * len(models))
                          for s, st in enumerate(stages)]
        return
    depths: dict[int, dict[int, int]] = {}

    def check(stages: list[list[Stage]], ref: int) -> None:
        for i in range(len(models)):
            try:
                depths[i] = plan_depths(traced[ref], stages[ref], traced[i], stages[i])
            except MismatchError as e:
                raise MismatchError(f"model {i} cannot be aligned to model {ref}, the one "
                                    f"with the most units of depth: {e}") from e

    stages, ref = aligned_stages(traced, check)
    alignments = [StageAlignment(s, st.name, [depths[i][s] for i in range(len(models))], ref,
                                 [list(range(depths[i][s])) for i in range(len(models))],
                                 [None] * len(models))
                  for s, st in enumerate(stages[ref])]
    ctx.alignments = alignments
    todo = [(a, i) for a in alignments for i, d in enumerate(a.depths)
            if 0 < d < a.depths[ref]]
    expanded = [i for i in range(len(models)) if any(
        a.depths[i] < a.depths[ref] for a in alignments)]
    # one pass over the calibration data: outputs of every unit of the stages to align
    matched = {i: corresponding_stages(traced[ref], stages[ref], traced[i], stages[i])
               for i in expanded}
    wanted = {i: sorted({u.output for a, j in todo if j == i
                         for u in matched[i][a.stage].units}) for i in expanded}
    wanted[ref] = sorted({u.output for a, _ in todo for u in stages[ref][a.stage].units})
    runners = {i: set_eval(feature_module(traced[i].graph_module, names))
               for i, names in wanted.items() if names}
    acc = {(a.stage, i): CKAAccumulator(a.depths[ref], a.depths[i]) for a, i in todo}
    if acc:
        with torch.no_grad():
            for batch in tqdm(ctx.batches, desc="unit CKA", disable=not ctx.config.progress,
                              leave=False):
                inputs = split_batch(batch, ctx.n_inputs)
                feats = {i: run(*inputs)[1] for i, run in runners.items()}
                for (s, i), cka in acc.items():
                    cka.update([feats[ref][u.output] for u in stages[ref][s].units],
                               [feats[i][u.output] for u in matched[i][s].units])
    for (s, i), cka in acc.items():
        a = alignments[s]
        a.cka[i] = cka.result()
        a.positions[i] = align(a.cka[i], ctx.config.align)
    ctx.models, ctx.traced = list(models), list(traced)
    calibration = [split_batch(b, ctx.n_inputs) for b in ctx.batches]
    for i in expanded:
        positions = {a.stage: a.positions[i] for a in alignments}
        ctx.models[i], fit, inserted = expand(models[i], traced[i], stages[i], traced[ref],
                                              stages[ref], positions, ctx.example_inputs,
                                              calibration=calibration)
        for a in alignments:
            a.fit_errors.update({k: v for k, v in fit.items()
                                 if k in _norm_owners(traced[ref], stages[ref][a.stage])})
            a.inserted.update(n for u in stages[ref][a.stage].units for n in u.nodes
                              if n in set(inserted))
        ctx.traced[i] = trace(ctx.models[i], ctx.example_inputs, frontend=ctx.config.frontend,
                              leaf_modules=ctx.config.leaf_modules)
        log.info("model %d expanded to model %d's topology: %s", i, ref,
                 {a.name: a.positions[i] for a in alignments})


def _norm_owners(traced: Traced, stage: Stage) -> set[str]:
    """Names of the norms inside a stage's units (how fit errors are keyed)."""
    out = set()
    for u in stage.units:
        for name in u.nodes:
            w = tensor_args(traced.node(name)).get("weight")
            if w:
                out.add(w.rpartition(".")[0])
    return out

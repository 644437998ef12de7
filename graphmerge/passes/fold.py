"""Pass `fold_norms` (merge option rotate=True): decide from the graph which spaces can be
rotated (`graph.rotatable`), and on a copy of every model fold the affine of each norm over
such a space into the linears that read it (`surgery.fold`), so that the statistics are
collected on the models the rotation will rewrite. Without rotate=True it records nothing."""

from __future__ import annotations

import copy
from dataclasses import replace

from graphmerge.graph.rotatable import Rotatable, rotatable_spaces
from graphmerge.match.selection import mergeable
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.fold import fold_norms as fold
from graphmerge.surgery.fold import fold_problem

__all__ = ["fold_norms"]


def _refuse(r: Rotatable, reason: str) -> Rotatable:
    return Rotatable(r.space, False, reason=reason)


@merge_pass(needs=("paired",), provides=("rotatable",), writes=("traced",))
def fold_norms(ctx: MergeContext) -> None:
    """Per merged space, whether every model admits an orthogonal transform of it; for those
    that do, the models' graphs are replaced by copies with the norms over it folded (the
    caller's models keep their parameters)."""
    ctx.rotatable = {}
    if not ctx.config.rotate:
        return
    tables = [t.space_table for t in ctx.traced]
    candidates = [s.id for s in mergeable(tables[0])]
    per_model = [rotatable_spaces(t, t.space_table, candidates) for t in ctx.traced]
    for sid in candidates:
        first = per_model[0][sid]
        bad = next((p[sid] for p in per_model if not p[sid].ok), None)
        if bad is not None:
            ctx.rotatable[sid] = bad
        elif len({t[sid].width for t in tables}) > 1:
            ctx.rotatable[sid] = _refuse(first, "the models' widths differ")
        else:
            problem = next((w for t, p in zip(ctx.traced, per_model)
                            if (w := fold_problem(t.graph_module, list(p[sid].norms)))), "")
            ctx.rotatable[sid] = _refuse(first, problem) if problem else first
    ok = [sid for sid, r in ctx.rotatable.items() if r.ok]
    if not ok:
        return
    identity: set[str] = set()
    for i, t in enumerate(ctx.traced):
        gm = copy.deepcopy(t.graph_module)
        identity |= set(fold(gm, [n for sid in ok for n in per_model[i][sid].norms]))
        ctx.traced[i] = replace(t, graph_module=gm)
    for sid in ok:  # a rotation leaves the folded scales (and biases) alone, in every model
        names = {n for p in per_model for n in p[sid].params} & identity
        ctx.rotatable[sid] = replace(ctx.rotatable[sid], params=tuple(sorted(names)))

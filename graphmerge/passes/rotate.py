"""Pass `rotate_spaces` (merge option rotate=True): for every rotatable space of equal widths,
rotate each model k ≥ 1 onto model 0 by orthogonal Procrustes on the cross moment of their
features (`match.rotation`; kept to Q·1 = 1 where a LayerNorm needs it), rewrite model k's
parameters on that space in place — an exact reparametrisation of its copy (`fold_norms` made
it) — and rotate its moments (no second pass over the data). The matcher then runs as usual
on the rotated models. A space whose moment is rank-deficient is left to the matcher (a
permuted self-merge stays exact), as is one that REPAIR corrects units of, or whose axis is
read as samples of another space."""

from __future__ import annotations

from dataclasses import replace

from graphmerge.match.rotation import RANK_RTOL, cross_moment, procrustes, rotate_stats
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.rotate import rotate_space

__all__ = ["rotate_spaces"]


def _blocked(ctx: MergeContext, sid: int) -> str:
    """Why the space's units cannot be rotated after the statistics ('' if they can)."""
    table = ctx.traced[0].space_table
    if sid not in ctx.stats:
        return "no statistics were collected for it"
    for node in ctx.unit_stats[0] if ctx.unit_stats else ():
        if sid in table.node_axes.get(node, {}).values():
            return (f"REPAIR corrects its units at `{node}` (per-unit statistics cannot be "
                    f"rotated)")
    for k, reads in ctx.reads.items():
        for r in reads[0] if k != sid else ():
            if sid in table.node_axes.get(r.node, {}).values():
                return f"space {k}'s features are read across it (`{r.node}`)"
    return ""


@merge_pass(needs=("stats", "rotatable"), provides=("rotations",), writes=("stats",))
def rotate_spaces(ctx: MergeContext) -> None:
    """Rotate every rotatable space of models 1… onto model 0; `rotations` says, per
    candidate space, whether it was rotated and else why not."""
    ctx.rotations = {}
    for sid, r in ctx.rotatable.items():
        why = r.reason if not r.ok else _blocked(ctx, sid)
        if why:
            ctx.rotations[sid] = replace(r, ok=False, reason=why)
            continue
        qs = {}
        for k in range(1, ctx.n_models):
            q, ratio = procrustes(cross_moment(ctx.stats[sid], k), r.ones)
            if q is None:
                why = (f"the features of models 0 and {k} are rank-deficient on it "
                       f"(singular value ratio {ratio:.1e} < {RANK_RTOL:g}): left to the "
                       f"matcher")
                break
            qs[k] = q
        if why:
            ctx.rotations[sid] = replace(r, ok=False, reason=why)
            continue
        for k, q in qs.items():
            t = ctx.traced[k]
            rotate_space(t.graph_module, t.space_table, sid, q, skip=r.params)
        ctx.stats[sid] = rotate_stats(ctx.stats[sid], qs)
        ctx.rotations[sid] = r

"""Pass `split_partial`: with `partial=` a cut, the merged module keeps the merged graph up to
the cut and each model's own layers after it (`graphmerge.surgery.partial`); the norms of
those layers are then corrected for the features the trunk now gives them (the configured
correction's `apply_tails`, `graphmerge.surgery.norms`)."""

from __future__ import annotations

from graphmerge.match.plans import SpaceTransforms
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.norms import NormInputs, get_correction
from graphmerge.surgery.partial import cut_node, split_at

__all__ = ["split_partial"]


@merge_pass(needs=("module", "norms_done", "refit", "plans", "head_mode"), provides=("cut",),
            writes=("module",))
def split_partial(ctx: MergeContext) -> None:
    """Replace the merged module by the partial one when a cut is configured."""
    if ctx.config.partial is None:
        ctx.cut = ""
        return
    cut = cut_node(ctx.traced[0], ctx.config.partial)
    tx = SpaceTransforms([t.space_table for t in ctx.traced], ctx.plans, ctx.n_models)
    ctx.module, names = split_at(ctx.module, ctx.traced, cut,
                                 lambda i, sid: tx.get(i, sid, False).T, tx.merged,
                                 ctx.head_mode)
    ctx.cut = cut.name
    order = [n.name for n in ctx.traced[0].graph.nodes]
    get_correction(ctx.config.norms).apply_tails(
        NormInputs(ctx.module, ctx.traced, ctx.plans, ctx.unit_stats, ctx.calibration,
                   max_memory=ctx.config.max_memory, progress=ctx.config.progress),
        names, set(order[:order.index(cut.name) + 1]))

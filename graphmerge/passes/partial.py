"""Pass `split_partial`: with `partial=` a cut, the merged module keeps the merged graph up to
the cut and each model's own layers after it (`graphmerge.surgery.partial`)."""

from __future__ import annotations

from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.passes.parameters import SpaceTransforms
from graphmerge.surgery.partial import cut_node, split_at


@merge_pass(needs=("module", "norms_done", "plans", "head_mode"), provides=("cut",))
def split_partial(ctx: MergeContext) -> None:
    """Replace the merged module by the partial one when a cut is configured."""
    if ctx.config.partial is None:
        ctx.cut = ""
        return
    cut = cut_node(ctx.traced[0], ctx.config.partial)
    tx = SpaceTransforms(ctx)
    ctx.module = split_at(ctx.module, ctx.traced, cut,
                          lambda i, sid: tx.get(i, sid, False).T, tx.merged, ctx.head_mode)
    ctx.cut = cut.name

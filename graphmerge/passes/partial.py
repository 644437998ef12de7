"""Pass `split_partial`: with `partial=` a cut, the merged module keeps the merged graph up to
the cut and each model's own layers after it (`graphmerge.surgery.partial`); the norms of
those layers are then corrected for the features the trunk now gives them."""

from __future__ import annotations

from dataclasses import replace

from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.passes.norms import repair_in_order, reset_batch_norms
from graphmerge.passes.parameters import SpaceTransforms
from graphmerge.surgery.partial import cut_node, split_at
from graphmerge.surgery.repair import repair_points


@merge_pass(needs=("module", "norms_done", "plans", "head_mode"), provides=("cut",),
            writes=("module",))
def split_partial(ctx: MergeContext) -> None:
    """Replace the merged module by the partial one when a cut is configured."""
    if ctx.config.partial is None:
        ctx.cut = ""
        return
    cut = cut_node(ctx.traced[0], ctx.config.partial)
    tx = SpaceTransforms(ctx)
    ctx.module, names = split_at(ctx.module, ctx.traced, cut,
                                 lambda i, sid: tx.get(i, sid, False).T, tx.merged,
                                 ctx.head_mode)
    ctx.cut = cut.name
    if ctx.config.norms == "reset":  # every BatchNorm, the models' own ones included
        reset_batch_norms(ctx.module, ctx.calibration, progress=ctx.config.progress)
    elif ctx.config.norms == "repair":
        order = [n.name for n in ctx.traced[0].graph.nodes]
        _repair_tails(ctx, names, set(order[:order.index(cut.name) + 1]))


def _repair_tails(ctx: MergeContext, names: list[dict[str, str]], trunk: set[str]) -> None:
    """REPAIR in each model's own layers: its units' statistics there are set back to the
    model's own (its merge matrix after the cut is the identity)."""
    for i, (traced, where) in enumerate(zip(ctx.traced, names)):
        points = [replace(p, tensors={role: f"model{i}.{t}" for role, t in p.tensors.items()})
                  for p in repair_points(traced, {s.id for s in traced.space_table})
                  if p.node not in trunk and p.measure in where]
        if not points:
            continue
        own = ctx.unit_stats[i]
        repair_in_order(ctx, points, lambda p: where[p.measure],
                        lambda p: own[p.node].moments())

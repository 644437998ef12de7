"""Pass `refit_linears` (merge option refit=True): after the norm correction, every linear
layer of the merged module is refitted by least squares to the merged image of the input
models' outputs on the calibration data (`graphmerge.surgery.refit`)."""

from __future__ import annotations

from graphmerge.match.plans import SpaceTransforms
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.norms import ACTIVATION_BUDGET
from graphmerge.surgery.refit import Refit, refit, refit_points

__all__ = ["refit_linears"]


@merge_pass(needs=("module", "norms_done", "plans"), provides=("refit",))
def refit_linears(ctx: MergeContext) -> None:
    """Refit the merged module's linear layers in place when the option asks for it."""
    if not ctx.config.refit:
        ctx.refit = Refit(skipped="refit=False")
        return
    tx = SpaceTransforms([t.space_table for t in ctx.traced], ctx.plans, ctx.n_models)
    ctx.refit = refit(
        ctx.module, ctx.traced, refit_points(ctx.traced[0]),
        lambda i, sid: tx.get(i, sid, True) if sid is not None and tx.merged(sid) else None,
        ctx.calibration, budget=ctx.config.max_memory or ACTIVATION_BUDGET,
        progress=ctx.config.progress)

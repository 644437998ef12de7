"""Pass `correct_norms`: renormalise the merged module on the calibration data with the norm
correction `norms=` names (`graphmerge.surgery.norms`): REPAIR (the default), BatchNorm
running statistics recomputed ("reset", as ZipIt and HET do), or none."""

from __future__ import annotations

from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.norms import NormInputs, get_correction

__all__ = ["correct_norms"]


@merge_pass(needs=("module", "unit_stats"), provides=("norms_done",))
def correct_norms(ctx: MergeContext) -> None:
    """Apply the configured norm correction to the merged module."""
    get_correction(ctx.config.norms).apply(NormInputs(
        ctx.module, ctx.traced, ctx.plans, ctx.unit_stats, ctx.calibration,
        max_memory=ctx.config.max_memory, progress=ctx.config.progress))
    ctx.norms_done = ctx.config.norms

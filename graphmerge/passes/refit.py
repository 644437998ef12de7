"""Pass `refit_linears` (merge option refit=True): after the norm correction, every linear
layer of the merged module is refitted by least squares to the merged image of the input
models' outputs on the calibration data (`graphmerge.surgery.refit`)."""

from __future__ import annotations

import warnings

from graphmerge.errors import FewSamplesWarning
from graphmerge.match.plans import SpaceTransforms
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.norms import ACTIVATION_BUDGET
from graphmerge.surgery.refit import SAMPLES_PER_INPUT, Refit, refit, refit_points

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
    if ctx.refit.kept:
        node, inputs, samples = ctx.refit.kept[0]
        warnings.warn(FewSamplesWarning(
            f"refit: {len(ctx.refit.kept)} layers kept their merged weights: fewer calibration "
            f"samples than inputs (e.g. `{node}`, {samples} samples for {inputs} inputs) would "
            f"only interpolate the calibration data; pass more calibration inputs to refit "
            f"them"), stacklevel=2)
    if ctx.refit.few:
        node, inputs, samples = min(ctx.refit.few, key=lambda f: f[2] / f[1])
        warnings.warn(FewSamplesWarning(
            f"refit: {len(ctx.refit.few)} of {ctx.refit.layers} layers saw fewer than "
            f"{SAMPLES_PER_INPUT} calibration samples per input (worst: `{node}`, {inputs} "
            f"inputs, {samples} samples): their fits follow the calibration data closely and "
            f"may not carry over to other inputs; pass more calibration inputs"), stacklevel=2)

"""Pass `measure_coverage`: how many parameters the plans align (`graphmerge.match.coverage`),
checked against `min_coverage` before any parameter is rewritten."""

from __future__ import annotations

from graphmerge.match.coverage import check_coverage, coverage
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

__all__ = ["measure_coverage"]


@merge_pass(needs=("plans", "head_mode"), provides=("coverage",))
def measure_coverage(ctx: MergeContext) -> None:
    """The `Coverage` of model 0's parameters under the final plans (heads included); a
    `CoverageError` below `min_coverage`, a `LowCoverageWarning` below one half."""
    traced = ctx.traced[0]
    ctx.coverage = coverage(traced.space_table, traced.graph_module, ctx.plans)
    # warn at the caller of merge(): this pass, Pass.__call__, run_passes, merge
    check_coverage(ctx.coverage, ctx.config.min_coverage, stacklevel=5)

"""Pass `trace_models`: capture every model as an fx graph and find its spaces."""

from __future__ import annotations

from graphmerge.graph.analyse import trace
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(provides=("traced",))
def trace_models(ctx: MergeContext) -> None:
    """Trace each model on the example inputs; the graphs share the models' parameters."""
    ctx.traced = [trace(m, ctx.example_inputs, frontend=ctx.config.frontend,
                        leaf_modules=ctx.config.leaf_modules)
                  for m in ctx.models]

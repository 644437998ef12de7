"""Pass `build_match_graph`: the networkx match graph of the merge, for a person to inspect."""

from __future__ import annotations

from graphmerge.match.match_graph import build_match_graph as build
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(needs=("plans", "module", "alignments"), provides=("match_graph",))
def build_match_graph(ctx: MergeContext) -> None:
    """Every model's nodes and spaces, with the pairs and widths the merge chose, and the
    error left by each fitted post-norm of an inserted unit (graph attribute)."""
    ctx.match_graph = build(ctx.traced, ctx.plans, ctx.config.method)
    fits = {k: v for a in ctx.alignments for k, v in a.fit_errors.items()}
    if fits:
        ctx.match_graph.graph["post_norm_fit_errors"] = "; ".join(
            f"{k} {v:.2e}" for k, v in fits.items())

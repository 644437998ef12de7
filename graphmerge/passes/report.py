"""Pass `build_match_graph`: the networkx match graph of the merge, for a person to inspect."""

from __future__ import annotations

from graphmerge.match.match_graph import build_match_graph as build
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(needs=("plans", "module"), provides=("match_graph",))
def build_match_graph(ctx: MergeContext) -> None:
    """Every model's nodes and spaces, with the pairs and widths the merge chose."""
    ctx.match_graph = build(ctx.traced, ctx.plans, ctx.config.method)

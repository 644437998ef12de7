"""Heads: average the outputs (the default: the merged model keeps model 0's interface) or keep
every model's head on the merged trunk and concatenate the logits (disjoint tasks)."""

from __future__ import annotations

import numpy as np

from graphmerge.errors import ConfigError
from graphmerge.graph.spaces import FrozenBy, Space
from graphmerge.match.plans import SpacePlan
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


def output_spaces(ctx: MergeContext) -> list[Space]:
    """Spaces written by parameters that reach the graph output (the heads' logits)."""
    return [s for s in ctx.traced[0].space_table
            if s.frozen_by is not None and s.frozen_by.by is FrozenBy.GRAPH_OUTPUT
            and s.producers]


@merge_pass(needs=("plans",), provides=("head_mode",), writes=("plans",))
def attach_heads(ctx: MergeContext) -> None:
    """"average" keeps model 0's interface (the outputs must have one width in every model);
    "concat" plans the output space as one block per model."""
    mode = ctx.head_mode = ctx.config.heads
    if mode == "average":
        for s in output_spaces(ctx):
            widths = [t.space_table[s.id].width for t in ctx.traced]
            if len(set(widths)) > 1:
                raise ConfigError(
                    f"the models' outputs differ in width ({widths}, space {s.id}), so they "
                    f"cannot be averaged; for models of disjoint tasks pass heads='concat' "
                    f"(every model keeps its head)")
        return
    outs = output_spaces(ctx)
    owners = {p.param.rsplit(".", 1)[0] for s in outs for p in s.producers}
    if len(outs) != 1 or len(owners) != 1:
        raise ConfigError(
            f"heads='concat' needs the output to come straight from one layer (found output "
            f"spaces {[s.id for s in outs]} written by {sorted(owners)}); use heads='average'")
    space = outs[0]
    widths = [t.space_table[space.id].width for t in ctx.traced]
    total, offset = sum(widths), 0
    merge, unmerge = [], []
    for w in widths:
        m = np.zeros((total, w))
        m[offset:offset + w] = np.eye(w)
        merge.append(m)
        unmerge.append(m.T.copy())
        offset += w
    ctx.plans[space.id] = SpacePlan(space.id, widths, total, "concat", merge, unmerge)

"""Heads: average the outputs (same label space) or keep every model's head on the merged trunk
and concatenate the logits (disjoint tasks)."""

from __future__ import annotations

import logging

import numpy as np

from graphmerge.errors import ConfigError
from graphmerge.graph.spaces import FrozenBy, Space
from graphmerge.passes.context import MergeContext, SpacePlan
from graphmerge.passes.manager import merge_pass

log = logging.getLogger(__name__)

AGREEMENT_THRESHOLD = 0.5


def output_spaces(ctx: MergeContext) -> list[Space]:
    """Spaces written by parameters that reach the graph output (the heads' logits)."""
    return [s for s in ctx.traced[0].space_table
            if s.frozen_by is not None and s.frozen_by.by is FrozenBy.GRAPH_OUTPUT
            and s.producers]


@merge_pass(needs=("plans", "agreement"), provides=("head_mode",))
def attach_heads(ctx: MergeContext) -> None:
    """Decide the head mode; for "concat", plan the output space as one block per model.

    "auto" averages when the models' argmax predictions on the calibration data agree on at
    least half of the samples (same label space) and concatenates otherwise (disjoint tasks);
    outputs that are not [batch, classes] logits are averaged.
    """
    mode = ctx.config.heads
    if mode == "auto" and ctx.agreement != ctx.agreement:  # NaN
        mode = "average"
        log.info("heads='auto': the outputs are not [batch, classes] logits, so they are "
                 "averaged (pass heads='concat' to keep every model's head)")
    elif mode == "auto":
        mode = "average" if ctx.agreement >= AGREEMENT_THRESHOLD else "concat"
        log.info("heads='auto': the models agree on %.0f%% of calibration predictions -> %s "
                 "(pass heads='average' or 'concat' to choose)", 100 * ctx.agreement, mode)
    ctx.head_mode = mode
    if mode == "average":
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

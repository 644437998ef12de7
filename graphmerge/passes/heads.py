"""Heads: average the outputs (same label space) or keep every model's head on the merged trunk
and concatenate the logits (disjoint tasks)."""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ConfigError
from ..spaces import Space
from .context import MergeContext, SpacePlan

log = logging.getLogger(__name__)

HEAD_MODES = ("auto", "average", "concat")
AGREEMENT_THRESHOLD = 0.5


def output_spaces(ctx: MergeContext) -> list[Space]:
    return [s for s in ctx.traced[0].space_table
            if s.frozen and s.why and "graph output" in s.why and s.producers]


def attach_heads(ctx: MergeContext) -> MergeContext:
    """Decide the head mode; for "concat", plan the output space as one block per model.

    "auto" averages when the models' argmax predictions on the calibration data agree on at
    least half of the samples (same label space) and concatenates otherwise (disjoint tasks).
    """
    if ctx.heads not in HEAD_MODES:
        raise ConfigError(f"heads={ctx.heads!r} is not one of {', '.join(HEAD_MODES)}")
    mode = ctx.heads
    if mode == "auto":
        ctx.require("attach_heads", agreement="collect_statistics")
        mode = "average" if ctx.agreement >= AGREEMENT_THRESHOLD else "concat"
        log.info("heads='auto': the models agree on %.0f%% of calibration predictions -> %s "
                 "(pass heads='average' or 'concat' to choose)", 100 * ctx.agreement, mode)
    ctx.head_mode = mode
    if mode == "average":
        return ctx
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
    return ctx

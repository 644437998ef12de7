"""Which spaces are merged, their statistics, and the matcher's M/U for each (zip_widths)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError
from ..matchers import get_matcher
from ..spaces import Space, SpaceTable
from ..stats import collect_stats
from .context import MergeContext, SpacePlan

log = logging.getLogger(__name__)


def mergeable(table: SpaceTable) -> list[Space]:
    """Free base spaces that a matcher can merge."""
    return [s for s in table if not s.frozen and s.derived is None]


def _feature_axes(space: Space):
    """The activations a space is matched on: what its consumers read, else its last member."""
    return list(space.reads) if space.reads else space.members[-1:]


def select_spaces(ctx: MergeContext) -> MergeContext:
    """Choose the spaces to merge and the activations to collect for each."""
    tables = [t.space_table for t in ctx.traced]
    ctx.reads = {}
    for s in mergeable(tables[0]):
        axes = _feature_axes(s)
        ctx.reads[s.id] = [[a for a in axes] for _ in tables]
    return ctx


def collect_statistics(ctx: MergeContext) -> MergeContext:
    """One pass over the calibration data: moments of every selected space, and how often the
    models' argmax predictions agree (used by heads='auto')."""
    ctx.require("collect_statistics", reads="select_spaces")
    agree = [0, 0]

    def on_outputs(outs):
        if all(isinstance(o, torch.Tensor) and o.dim() == 2 for o in outs) and len(
                {o.shape[1] for o in outs}) == 1:
            top = [o.argmax(1) for o in outs]
            agree[0] += sum(int((t == top[0]).sum()) for t in top[1:])
            agree[1] += sum(t.numel() for t in top[1:])

    ctx.stats = collect_stats([t.graph_module for t in ctx.traced], ctx.reads, ctx.batches,
                              ctx.n_inputs, progress=ctx.progress, on_outputs=on_outputs)
    ctx.agreement = agree[0] / agree[1] if agree[1] else 0.0
    return ctx


def target_width(width: Any, sid: int, widths: list[int]) -> int | None:
    """The merged width r of space `sid`: `width` is None (the widest model's width), a ratio
    of it (float), or a mapping {space id: int width or float ratio} (others default)."""
    if isinstance(width, Mapping):
        unknown = [k for k in width if not isinstance(k, int)]
        if unknown:
            raise ConfigError(f"width= keys must be space ids (ints), got {unknown}")
        width = width.get(sid)
    if width is None:
        return None
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"width for space {sid} must be a positive int (units) or float "
                          f"(ratio of the widest model's {max(widths)}), got {width!r}")
    r = width if isinstance(width, int) else max(1, round(width * max(widths)))
    if not 1 <= r <= sum(widths):
        raise ConfigError(f"width {r} for space {sid} is out of range: 1 <= r <= "
                          f"{sum(widths)} (the sum of the models' widths {widths})")
    return r


def match_spaces(ctx: MergeContext) -> MergeContext:
    """Run the matcher on every selected space's correlation matrix (zip_widths)."""
    ctx.require("match_spaces", stats="collect_statistics")
    matcher = get_matcher(ctx.method)
    if isinstance(ctx.width, int) and not isinstance(ctx.width, bool):
        raise ConfigError(f"width={ctx.width}: a single width must be a ratio of the widest "
                          f"model (e.g. 0.5 or 1.5); give units per space as {{space id: units}}")
    if isinstance(ctx.width, Mapping):
        unknown = sorted(set(ctx.width) - set(ctx.stats))
        if unknown:
            raise ConfigError(f"width= names spaces {unknown} that are not merged; mergeable "
                              f"spaces: {sorted(ctx.stats)} (see graphmerge inspect)")
    for sid, st in ctx.stats.items():
        r = target_width(ctx.width, sid, st.widths)
        match = matcher(st.correlation(), st.widths, r=r, alpha=ctx.alpha, beta=ctx.beta)
        ctx.plans[sid] = SpacePlan(sid, list(st.widths), match.width, ctx.method, match.merge,
                                   match.unmerge, match.mean_correlation)
    log.info("matched %d spaces with %s", len(ctx.plans), ctx.method)
    return ctx

"""Pass `match_spaces`: the matcher's merge and unmerge matrices for every merged space."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from graphmerge.errors import ConfigError
from graphmerge.match.matchers import get_matcher
from graphmerge.passes.context import MergeContext, SpacePlan
from graphmerge.passes.manager import merge_pass

__all__ = ["match_spaces", "target_width"]

log = logging.getLogger(__name__)


def target_width(width: Any, sid: int, widths: list[int]) -> int | None:
    """The merged width r of space `sid`: `width` is None (the widest model's width), a ratio
    of it (float), or a mapping {space id: int width or float ratio} (others default).
    Values were validated by `MergeConfig`; the range depends on the models' widths."""
    if isinstance(width, Mapping):
        width = width.get(sid)
    if width is None:
        return None
    r = width if isinstance(width, int) else max(1, round(width * max(widths)))
    if not 1 <= r <= sum(widths):
        raise ConfigError(f"width {r} for space {sid} is out of range: 1 <= r <= "
                          f"{sum(widths)} (the sum of the models' widths {widths})")
    return r


@merge_pass(needs=("stats",), provides=("plans",))
def match_spaces(ctx: MergeContext) -> None:
    """Run the configured matcher on every merged space's correlation matrix."""
    cfg = ctx.config
    matcher = get_matcher(cfg.method)
    if isinstance(cfg.width, Mapping):
        unknown = sorted(set(cfg.width) - set(ctx.stats))
        if unknown:
            raise ConfigError(f"width= names spaces {unknown} that are not merged; mergeable "
                              f"spaces: {sorted(ctx.stats)} (see graphmerge inspect)")
    options = cfg.matcher_options()
    ctx.plans = {}
    for sid, st in ctx.stats.items():
        match = matcher(st.correlation(), st.widths, target_width(cfg.width, sid, st.widths),
                        **options)
        ctx.plans[sid] = SpacePlan(sid, list(st.widths), match.width, cfg.method, match.merge,
                                   match.unmerge, match.mean_correlation)
    log.info("matched %d spaces with %s", len(ctx.plans), cfg.method)

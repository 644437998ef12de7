"""Pass `match_spaces`: the matcher's merge and unmerge matrices for every merged space."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from graphmerge.errors import FewSamplesWarning, MismatchError
from graphmerge.graph.memory import give_back
from graphmerge.match.heads import grouped, match_heads, renormalized
from graphmerge.match.matchers import get_matcher, group_correlations
from graphmerge.match.plans import SpacePlan
from graphmerge.match.selection import check_width_spaces, head_projections, target_width
from graphmerge.graph.spaces import SpaceTable
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

__all__ = ["match_spaces"]

log = logging.getLogger(__name__)


@merge_pass(needs=("stats",), provides=("plans",), writes=("stats",))
def match_spaces(ctx: MergeContext) -> None:
    """Run the configured matcher on every merged space's correlation matrix (a torch tensor
    on the statistics' device, built once per space and read by the matcher there). Each
    space's correlation is written over its Σxxᵀ, which is used up, and is the zip's scratch
    (scores in its upper triangle, the correlations kept in its lower one): one d x d tensor
    per space, freed once the space is matched (the spaces whose sums are float32 are widened
    one after another in one float64 buffer). Under `max_memory` the statistics come a pass at
    a time (`StreamedStats`), each space's released once matched."""
    cfg = ctx.config
    matcher = get_matcher(cfg.method)
    check_width_spaces(cfg.width, ctx.stats.planned, set(head_projections(
        ctx.traced[0].space_table, cfg.attention)))
    options = cfg.matcher_options()
    ctx.plans = {}
    tables = [t.space_table for t in ctx.traced]
    heads = head_projections(tables[0], cfg.attention)
    projections = {by_dim[d][0] for by_dim in heads.values() for d in by_dim}
    pool: dict = {}  # one float64 buffer, reused
    for sid, st in ctx.stats.items():  # a later pass's spaces are measured as they come
        if sid in projections:
            continue
        corr = st.correlation(consume=True, pool=pool)
        del ctx.stats[sid]
        match = matcher(corr, st.widths, target_width(cfg.width, sid, st.widths),
                        overwrite=True, **options)  # its upper triangle: the zip's scores
        ctx.plans[sid] = SpacePlan(sid, list(st.widths), match.width, cfg.method, match.merge,
                                   match.unmerge, match.mean_correlation,
                                   group_correlations(corr.mT, match.groups),
                                   match.groups if cfg.method == "zip" else None)
        del corr, match  # before the next space's correlation is built (in the buffer)
    for h, by_dim in heads.items():
        _match_heads(ctx, tables, h, by_dim, matcher, options)
    del pool
    warn_few_samples(ctx.stats.counts, tables[0])
    give_back(ctx.models)  # the statistics, used up
    log.info("matched %d spaces with %s", len(ctx.plans), cfg.method)


def _match_heads(ctx: MergeContext, tables: list, h: int, by_dim: dict[int, list[int]],
                 matcher: Any, options: dict) -> None:
    """Plans of a heads space, of its projections and of its shared head dims
    (`graphmerge.match.heads`); head dims may differ in width between models (elastic: the
    merged head dim is the widest)."""
    counts = [t[h].width for t in tables]
    # the heads' projections are small spaces: match_heads pairs their dims on the host
    hm = match_heads([ctx.stats[ks[0]].correlation(consume=True).cpu().numpy()
                      for ks in by_dim.values()],
                     counts, [[t[d].width for t in tables] for d in by_dim], matcher,
                     target_width(ctx.config.width, h, counts),
                     fixed=[tables[0][d].frozen for d in by_dim],
                     shared=[d in tables[0].shared_dims for d in by_dim], **options)
    r = hm.heads.width
    ctx.plans[h] = SpacePlan(h, counts, r, ctx.config.method, hm.heads.merge, hm.heads.unmerge,
                             hm.heads.mean_correlation)
    for j, (d, krons) in enumerate(by_dim.items()):
        if krons[0] in tables[0].head_groups:
            raise MismatchError(f"the attention heads of space {h} are only read grouped (head "
                                f"dim {d}): their key/value projection was not found")
        width = hm.widths[j]
        if hm.dims[j] is not None:  # one pairing of the dim for every head (group): a
            # weight that writes it alone (a transposed grouped conv's axis 1) averages
            ctx.plans[d] = SpacePlan(d, _widths(tables, d), width, ctx.config.method,
                                     hm.dims[j], [(m != 0).T.astype(float) for m in hm.dims[j]],
                                     hm.heads.mean_correlation)
        for k in krons:
            ctx.plans[k] = _projection_plan(ctx, tables, k, d, hm, j)


def _projection_plan(ctx: MergeContext, tables: list, k: int, d: int, hm: Any,
                     j: int) -> SpacePlan:
    """The plan of projection k (heads × group × head dim j): the heads' blocks repeated
    over the group; models with groups of different sizes merge to the largest (query j of
    a group is merged query j, a slot only larger groups have averages those alone)."""
    groups = [t.head_groups.get(k, 1) for t in tables]
    big, width = max(groups), hm.widths[j]
    merge = [grouped(m, w, g, width, True, big)
             for m, w, g in zip(hm.merge[j], _widths(tables, d), groups)]
    unmerge = [grouped(u, w, g, width, False, big)
               for u, w, g in zip(hm.unmerge[j], _widths(tables, d), groups)]
    return SpacePlan(k, _widths(tables, k), hm.heads.width * big * width, ctx.config.method,
                     renormalized(merge) if len(set(groups)) > 1 else merge, unmerge,
                     hm.heads.mean_correlation)


def _widths(tables: list, sid: int) -> list[int]:
    return [t[sid].width for t in tables]


def warn_few_samples(counts: dict[int, int], table: SpaceTable) -> None:
    """FewSamplesWarning when a space's features had fewer samples than its units (in one
    model): its correlations cannot tell all units apart, so its matching is a guess."""
    short = [(c / max(table[k].width, 1), k, c) for k, c in counts.items()
             if c < table[k].width]
    if not short:
        return
    _, k, count = min(short)
    warnings.warn(FewSamplesWarning(
        f"the calibration data gave {len(short)} of {len(counts)} merged spaces fewer samples "
        f"than units (worst: space {k}, {table[k].width} units seen in {count} samples, "
        f"e.g. a layer on a 1×1 map sees one sample per input): their matching is "
        f"underdetermined; pass more calibration inputs"), stacklevel=2)

"""Pass `collect_statistics`: which spaces are merged, and one streamed pass over the
calibration data that accumulates their feature moments (`graphmerge.match.statistics`)."""

from __future__ import annotations

from graphmerge.graph.spaces import Space, SpaceTable
from graphmerge.match.statistics import collect_stats
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.repair import repair_points

__all__ = ["collect_statistics", "mergeable", "head_projections"]


def mergeable(table: SpaceTable) -> list[Space]:
    """Free base spaces that a matcher merges on their own (heads and head dims are merged
    through their projections, see `head_projections`)."""
    grouped = {sid for h, ks in table.heads.items() for sid in (h, *(d for _, d in ks))}
    return [s for s in table if not s.frozen and s.derived is None and s.id not in grouped]


def head_projections(table: SpaceTable) -> dict[int, dict[int, list[int]]]:
    """Per heads space, its projections (kron spaces) by head dim: {heads: {dim: [krons]}};
    the first of each is laid out heads × dim (its statistics score the heads), grouped
    queries (heads × group × dim) come last."""
    out: dict[int, dict[int, list[int]]] = {}
    for h, ks in table.heads.items():
        for k, d in sorted(ks, key=lambda kd: kd[0] in table.head_groups):
            out.setdefault(h, {}).setdefault(d, []).append(k)
    return out


def _reads(space: Space, inserted: set[str]) -> list:
    """The space's reads, without those inside identity units that depth alignment inserted
    (their weights are placeholders) unless nothing else reads the space."""
    kept = [r for r in space.reads if r.node.partition("#")[0] not in inserted]
    return kept or list(space.reads)


@merge_pass(needs=("paired", "alignments"), provides=("reads", "stats", "unit_stats"))
def collect_statistics(ctx: MergeContext) -> None:
    """Moments of every mergeable space's features and of the attention projections, and
    (for REPAIR) per-unit sums at every repair point of the models: one pass."""
    tables = [t.space_table for t in ctx.traced]
    inserted = {n for a in ctx.alignments for n in a.inserted}
    ctx.reads = {s.id: [_reads(s, inserted) for _ in tables] for s in mergeable(tables[0])}
    for by_dim in head_projections(tables[0]).values():  # keyed by each dim's first projection
        for krons in by_dim.values():
            reads = [a for k in krons if k not in tables[0].head_groups  # (heads × dim)
                     for a in _reads(tables[0][k], inserted)]
            ctx.reads[krons[0]] = [reads for _ in tables]
    units = {}
    if ctx.config.norms == "repair":  # REPAIR's targets (every space: partial tails too)
        units = {p.node: p.dim for p in repair_points(ctx.traced[0],
                                                      {s.id for s in tables[0]})}
    widths = {k: sum(t[k].width for t in tables) for k in ctx.reads}
    ctx.stats, ctx.unit_stats = collect_stats(
        [t.graph_module for t in ctx.traced], ctx.reads, ctx.calibration, units=units,
        widths=widths, max_memory=ctx.config.max_memory, progress=ctx.config.progress)

"""Pass `collect_statistics`: which spaces are merged, and one streamed pass over the
calibration data that accumulates their feature moments (`graphmerge.match.statistics`)."""

from __future__ import annotations

from graphmerge.graph.spaces import Space, SpaceTable
from graphmerge.match.statistics import collect_stats
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

__all__ = ["collect_statistics", "mergeable", "head_projections"]


def mergeable(table: SpaceTable) -> list[Space]:
    """Free base spaces that a matcher merges on their own (heads and head dims are merged
    through their projections, see `head_projections`)."""
    grouped = {sid for h, ks in table.heads.items() for sid in (h, *(d for _, d in ks))}
    return [s for s in table if not s.frozen and s.derived is None and s.id not in grouped]


def head_projections(table: SpaceTable, attention: str = "heads"
                     ) -> dict[int, dict[int, list[int]]]:
    """Per heads space, its projections (kron spaces) by head dim: {heads: {dim: [krons]}};
    the first of each is laid out heads × dim (its statistics score the heads), grouped
    queries (heads × group × dim) come last. None with attention="frozen" (heads and head
    dims keep the identity)."""
    out: dict[int, dict[int, list[int]]] = {}
    if attention == "frozen":
        return out
    for h, ks in table.heads.items():
        for k, d in sorted(ks, key=lambda kd: kd[0] in table.head_groups):
            out.setdefault(h, {}).setdefault(d, []).append(k)
    return out


def _reads(space: Space, inserted: set[str]) -> list:
    """The space's reads, without those inside identity units that depth alignment inserted
    (their weights are placeholders) unless nothing else reads the space."""
    kept = [r for r in space.reads if r.node.partition("#")[0] not in inserted]
    return kept or list(space.reads)


@merge_pass(needs=("paired", "alignments"), provides=("reads", "stats"))
def collect_statistics(ctx: MergeContext) -> None:
    """Moments of every mergeable space's features and of the attention projections."""
    tables = [t.space_table for t in ctx.traced]
    inserted = {n for a in ctx.alignments for n in a.inserted}
    ctx.reads = {s.id: [_reads(s, inserted) for _ in tables] for s in mergeable(tables[0])}
    for by_dim in head_projections(tables[0], ctx.config.attention).values():  # keyed by each dim's first projection
        for krons in by_dim.values():
            reads = [a for k in krons if k not in tables[0].head_groups  # (heads × dim)
                     for a in _reads(tables[0][k], inserted)]
            ctx.reads[krons[0]] = [reads for _ in tables]
    ctx.stats = collect_stats([t.graph_module for t in ctx.traced], ctx.reads, ctx.batches,
                              ctx.n_inputs, progress=ctx.config.progress)

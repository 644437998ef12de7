"""Pass `collect_statistics`: which spaces are merged, and one streamed pass over the
calibration data that accumulates their feature moments (`graphmerge.match.statistics`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from graphmerge.errors import DataError
from graphmerge.graph.axes import NodeAxis
from graphmerge.graph.spaces import Space, SpaceTable
from graphmerge.match.selection import head_projections, mergeable
from graphmerge.match.statistics import collect_stats
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.surgery.norms import get_correction

__all__ = ["collect_statistics", "check_signal", "pooled_axes"]


def _reads(space: Space, inserted: set[str]) -> list:
    """The space's reads, without those inside identity units that depth alignment inserted
    (their weights are placeholders) unless nothing else reads the space."""
    kept = [r for r in space.reads if r.node.partition("#")[0] not in inserted]
    return kept or list(space.reads)


def pooled_axes(table: SpaceTable, reads: list[NodeAxis]) -> dict[tuple[str, int], tuple]:
    """Per read, the other transformable axes of the value it reads: (node, dim) → dims. Such an
    axis (the channels of a token-mixing MLP, read as its hidden units' samples) is laid out
    differently in each model, so its positions cannot be compared as samples; the features
    are averaged over it first (a mean is the same under any permutation or merge of it)."""
    out = {}
    for read in reads:
        dims = table.node_axes.get(read.node, {})
        others = tuple(sorted(d for d, sid in dims.items()
                              if d != read.dim and not table[sid].frozen))
        if others:
            out[read.node, read.dim] = others
    return out


@merge_pass(needs=("paired", "alignments"), provides=("reads", "stats", "unit_stats"))
def collect_statistics(ctx: MergeContext) -> None:
    """Moments of every mergeable space's features and of the attention projections, and
    (for a norm correction that reads them, REPAIR) per-unit sums at every repair point of
    the models: one pass."""
    tables = [t.space_table for t in ctx.traced]
    inserted = {n for a in ctx.alignments for n in a.inserted}
    ctx.reads = {}
    for s in mergeable(tables[0]):
        ctx.reads[s.id] = [_reads(s, inserted) for _ in tables]
    for by_dim in head_projections(tables[0], ctx.config.attention).values():  # per dim's first
        for krons in by_dim.values():
            reads = [a for k in krons if k not in tables[0].head_groups  # (heads × dim)
                     for a in _reads(tables[0][k], inserted)]
            ctx.reads[krons[0]] = [reads for _ in tables]
    check_signal(ctx.calibration)
    units = get_correction(ctx.config.norms).unit_points(ctx.traced[0])
    widths = {k: sum(t[k].width for t in tables) for k in ctx.reads}
    pooled = pooled_axes(tables[0], [a for per_model in ctx.reads.values() for a in per_model[0]])
    ctx.stats, ctx.unit_stats = collect_stats(
        [t.graph_module for t in ctx.traced], ctx.reads, ctx.calibration, units=units,
        pooled=pooled,
        widths=widths, max_memory=ctx.config.max_memory, progress=ctx.config.progress)


def check_signal(calibration: Iterable[tuple[Any, ...]]) -> None:
    """Refuse calibration data whose samples are all the same (all-zero or constant inputs, a
    single example): every activation is then constant, every correlation 0 or 1 by
    convention, and the matching meaningless. One pass over the inputs, no model run; it stops
    at the first sample that differs from the first. Batches without a tensor input are not
    judged.

    (The statistics cannot tell: a space's reads — a producer's output and what its consumers
    read — are stacked as samples, so a unit varies between them even on constant data.)

    Raises:
        DataError: saying the data carry no signal and what to pass instead, or that every
            batch is empty.
    """
    first: list[torch.Tensor] | None = None
    samples = seen = 0
    for batch in calibration:
        seen += 1
        inputs = [x for x in batch if isinstance(x, torch.Tensor) and x.dim() > 0]
        if not inputs:
            return  # nothing to compare: let the statistics speak
        if len(inputs[0]) == 0:
            continue
        if first is None:
            first = [x[:1] for x in inputs]
        if len(inputs) != len(first) or any(
                x.shape[1:] != f.shape[1:] or not bool((x == f).all())
                for x, f in zip(inputs, first)):
            return
        samples += len(inputs[0])
    if first is None:  # no batch (the statistics pass says so) or only empty ones
        if seen:
            raise DataError(f"the calibration data is empty: its {seen} batch(es) have size 0")
        return
    if samples:
        raise DataError(
            f"the calibration data carry no signal: all {samples} samples are the same (e.g. "
            f"all zeros or one example), so every activation is constant. Pass real inputs of "
            f"the models' task, e.g. a few hundred training examples.")

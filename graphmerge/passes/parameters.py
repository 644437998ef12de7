"""Pass `merge_parameters`: Σ_i (parameter of model i with M_i on one `out` axis, U_iᵀ on the
others).

For each parameter the first `out` axis in a merged space (else the first `out` axis in any
space) carries the merge matrix M_i, which averages the members of each merged unit; every other
axis in a space uses the membership matrix U_iᵀ (identity for spaces that are not merged). A
parameter without an `out` axis in any space is averaged (×1/N). Derived spaces compose their
parts (`graphmerge.graph.transforms`): block-diagonal for concatenations, Kronecker for
row-major products (only the primary part averages). Non-float tensors (integer buffers) are
taken from model 0. The per-model transforms are `graphmerge.match.plans.SpaceTransforms`.
"""

from __future__ import annotations

import numpy as np
import torch

from graphmerge.graph.tensors import canonical_names, named_tensors, take
from graphmerge.match.plans import SpaceTransforms
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

__all__ = ["merge_parameters"]


#: a transform with at most this many nonzeros per output row on average is applied as a
#: gather and a scatter-add (a matcher's merge matrix: 1 or a few members per merged unit)
_SPARSE = 4


def _apply(t: torch.Tensor, dim: int, a: np.ndarray, dtype: torch.dtype,
           entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """Contract axis `dim` of t (size d) with a [r, d] in `dtype`: the axis becomes size r (on
    t's device). A sparse `a` (the usual case: memberships and group averages) reads only the
    rows of t it weights, converted to `dtype` once gathered (the same values as converting
    first): O(nonzeros · rest) instead of a dense O(r · d · rest) product and a full copy.
    `entries`: a's nonzeros (rows, columns, values; row-major) when known, so that `a`, mostly
    zeros that never took memory, is not read."""
    rows, cols = entries[:2] if entries is not None else np.nonzero(a)
    if len(rows) > _SPARSE * a.shape[0]:
        moved = torch.tensordot(torch.from_numpy(a).to(device=t.device, dtype=dtype),
                                t.to(dtype), dims=([1], [dim]))
        return moved.movedim(0, dim)
    picked = take(t, dim, torch.from_numpy(cols).to(device=t.device)).to(dtype)
    weight = entries[2] if entries is not None else a[rows, cols]
    if not (weight == 1.0).all():  # x * 1 is x: a selection needs no product
        shape = [1] * t.dim()
        shape[dim] = -1
        picked *= torch.from_numpy(weight).to(device=t.device, dtype=dtype).reshape(shape)
    if len(rows) == a.shape[0] and (rows == np.arange(len(rows))).all():
        return picked  # one entry per row (nonzero lists rows in order)
    size = list(t.shape)
    size[dim] = a.shape[0]
    out = torch.zeros(size, dtype=dtype, device=t.device)
    return out.index_add_(dim, torch.from_numpy(rows).to(device=t.device), picked)


@merge_pass(needs=("plans", "head_mode"), provides=("merged_state",))
def merge_parameters(ctx: MergeContext) -> None:
    """Every merged parameter and buffer of model 0's graph (computed in float32, or float64
    for a float64 model, and cast back: a merged unit averages a few members)."""
    tx = SpaceTransforms([t.space_table for t in ctx.traced], ctx.plans, ctx.n_models)
    tables = tx.tables
    roles = {(a.param, a.dim): a.role for s in tables[0] for a in s.params}
    named = [named_tensors(t.graph_module) for t in ctx.traced]
    canonical = canonical_names(ctx.traced[0].graph_module)
    merged: dict[str, torch.Tensor] = {}
    for name, ref in named[0].items():
        if canonical[name] != name:
            continue  # a tied weight: merged once, under its first name
        if not ref.is_floating_point():
            merged[name] = ref.detach().clone()
            continue
        axes = tables[0].param_axes.get(name, {})
        outs = [d for d in sorted(axes) if roles.get((name, d)) == "out"]
        avg_axis = next((d for d in outs if tx.merged(axes[d])), outs[0] if outs else None)
        total = None
        work = torch.promote_types(ref.dtype, torch.float32)
        for i in range(ctx.n_models):
            value = named[i][name].detach()  # in `work` from its first transform on
            for dim, sid in sorted(axes.items()):
                if tx.merged(sid):
                    value = _apply(value, dim, tx.get(i, sid, dim == avg_axis), work,
                                   tx.entries(i, sid, dim == avg_axis))
                elif dim == avg_axis:  # the identity / N, without a dense [d, d] (a vocabulary)
                    value = value.to(work) / ctx.n_models
            value = value.to(work)
            total = value if total is None else total + value
        if avg_axis is None:
            total = total / ctx.n_models
        merged[name] = total.to(ref.dtype)
    ctx.merged_state = merged

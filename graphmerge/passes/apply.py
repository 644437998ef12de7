"""Merged parameters: Σ_i (parameter of model i with M_i on one `out` axis, U_iᵀ on the others).

For each parameter the first `out` axis in a merged space (else the first `out` axis in any
space) carries the merge matrix M_i, which averages the members of each merged unit; every other
axis in a space uses the membership matrix U_iᵀ (identity for spaces that are not merged). A
parameter without an `out` axis in any space is averaged (×1/N). Derived spaces compose their
parts: block-diagonal for concatenations, Kronecker for row-major products (only the first
part averages). Non-float tensors (integer buffers) are taken from model 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MismatchError
from ..spaces import SpaceTable
from .context import MergeContext


def _block_diag(mats: list[np.ndarray]) -> np.ndarray:
    rows, cols = sum(m.shape[0] for m in mats), sum(m.shape[1] for m in mats)
    out = np.zeros((rows, cols))
    r = c = 0
    for m in mats:
        out[r:r + m.shape[0], c:c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


class _Transforms:
    """Per-model axis transforms [r, d_i] for every space, built on demand and cached."""

    def __init__(self, ctx: MergeContext) -> None:
        self.ctx = ctx
        self.tables: list[SpaceTable] = [t.space_table for t in ctx.traced]
        self.cache: dict[tuple[int, int, str], np.ndarray] = {}

    def merged(self, sid: int) -> bool:
        """Whether the space (or some part of it) is merged by a plan."""
        if sid in self.ctx.plans:
            return True
        d = self.tables[0][sid].derived
        return d is not None and any(p is not None and self.merged(p) for p in d.parts)

    def get(self, i: int, sid: int, kind: str) -> np.ndarray:
        """kind "avg": M_i (averages); kind "sel": U_iᵀ (selects)."""
        key = (i, sid, kind)
        if key not in self.cache:
            self.cache[key] = self._build(i, sid, kind)
        return self.cache[key]

    def _build(self, i: int, sid: int, kind: str) -> np.ndarray:
        plan = self.ctx.plans.get(sid)
        if plan is not None:
            return plan.merge[i] if kind == "avg" else plan.unmerge[i].T
        space = self.tables[i][sid]
        if space.derived is None or not self.merged(sid):
            widths = {t[sid].width for t in self.tables}
            if len(widths) > 1:
                why = space.why or "it is not merged"
                raise MismatchError(
                    f"space {sid} keeps the identity ({why}) but its width differs between "
                    f"models: {[t[sid].width for t in self.tables]}")
            eye = np.eye(space.width)
            return eye / self.ctx.n_models if kind == "avg" else eye
        d = space.derived
        parts = []
        for k, (p, w) in enumerate(zip(d.parts, d.sizes)):
            # a Kronecker product averages through its first transformable part only
            first = next((j for j, q in enumerate(d.parts) if q is not None), None)
            part_kind = kind if d.kind == "cat" or k == first else "sel"
            parts.append(np.eye(w) if p is None else self.get(i, p, part_kind))
        if d.kind == "cat":
            return _block_diag(parts)
        out = np.ones((1, 1))
        for m in parts:
            out = np.kron(out, m)
        return out


def _apply(t: torch.Tensor, dim: int, a: np.ndarray) -> torch.Tensor:
    """Contract axis `dim` of t (size d) with a [r, d]: the axis becomes size r."""
    moved = torch.tensordot(torch.from_numpy(a), t, dims=([1], [dim]))
    return moved.movedim(0, dim)


def merge_parameters(ctx: MergeContext) -> MergeContext:
    """Compute every merged parameter and buffer of model 0's graph (float64, cast back)."""
    tx = _Transforms(ctx)
    tables = tx.tables
    roles = {(a.param, a.dim): a.role for s in tables[0] for a in s.params}
    named = []
    for t in ctx.traced:
        d = dict(t.graph_module.named_parameters(remove_duplicate=False))
        d.update(t.graph_module.named_buffers(remove_duplicate=False))
        named.append(d)
    merged: dict[str, torch.Tensor] = {}
    for name, ref in named[0].items():
        if not ref.is_floating_point():
            merged[name] = ref.detach().clone()
            continue
        axes = tables[0].param_axes.get(name, {})
        outs = [d for d in sorted(axes) if roles.get((name, d)) == "out"]
        avg_axis = next((d for d in outs if tx.merged(axes[d])), outs[0] if outs else None)
        total = None
        for i in range(ctx.n_models):
            value = named[i][name].detach().double()
            for dim, sid in sorted(axes.items()):
                value = _apply(value, dim, tx.get(i, sid, "avg" if dim == avg_axis else "sel"))
            total = value if total is None else total + value
        if avg_axis is None:
            total = total / ctx.n_models
        merged[name] = total.to(ref.dtype)
    ctx.merged_state = merged
    return ctx

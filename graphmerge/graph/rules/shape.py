"""Axis rules of pooling, reductions and shape ops (reshape, permute, cat, split, index)."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphmerge.graph.axes import (
    Cat,
    Freeze,
    Keep,
    Kron,
    Link,
    NodeAxis,
    ParamAxis,
    Same,
)
from graphmerge.graph.rules.registry import (
    Op,
    dims,
    get_attr_tensor,
    is_metadata,
    keep_all,
    ndim,
    register,
)
from graphmerge.graph.rules.weight_path import weight_roles

# ---- pooling and reductions ----------------------------------------------------------------

_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)


# resampling interpolates each channel's map alone: like a pool, it keeps the channels
_RESAMPLE = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate,
             F.upsample, F.upsample_nearest, F.upsample_bilinear)


@register(*_POOL_MODULES, *_POOL_FUNCTIONS, *_RESAMPLE)
def _pool(op: Op) -> Iterator[Link]:
    """Batch and channel axes pass through; spatial axes are unmentioned, hence frozen."""
    x = op.arg(0, "input")
    yield Same(op.x(x, 0), op.out(0))
    yield Same(op.x(x, 1), op.out(1))


_REDUCTIONS = (torch.sum, torch.mean, torch.amax, torch.amin, torch.std, torch.var,
               torch.logsumexp, torch.norm, torch.prod, torch.var_mean, torch.std_mean,
               "sum", "mean", "amax", "amin", "std", "var", "logsumexp", "norm", "prod")


@register(*_REDUCTIONS)
def _reduce(op: Op) -> Iterator[Link]:
    """Reduced axes are read symmetrically (Keep); surviving axes pass through (to both
    results of var_mean / std_mean)."""
    x = op.node.args[0]
    n = ndim(op, x)
    dim = op.arg(2 if op.name == "norm" else 1, "dim")
    reduced = dims(dim, n) if n else []
    if reduced is None:
        reduced = list(range(n))
    results = _results(op)
    keepdim = len(results[0][1]) == n  # read off the shapes: robust to every signature
    out_d = 0
    for d in range(n):
        if d in reduced:
            a = op.x(x, d)
            if a is not None:
                yield Keep(a, reduced=True)
            out_d += keepdim
        else:
            yield Same(op.x(x, d), *(NodeAxis(name, out_d) for name, s in results
                                     if s[out_d] != 1))
            out_d += 1


def _results(op: Op) -> list[tuple[str, tuple[int, ...]]]:
    """(axis node name, shape) of each tensor an op returns: `node`, or `node#k` for a tuple."""
    s = op._shapes.get(op.node.name) or ()
    if all(isinstance(w, int) for w in s):
        return [(op.node.name, s)]
    return [(f"{op.node.name}#{k}", p) for k, p in enumerate(s)]


# ---- shape ops ------------------------------------------------------------------------------


def _reshape_links(op: Op, src: Any) -> Iterator[Link]:
    """Group the axes of `src` and of the output by equal running products (size-1 axes drop),
    then follow each group as an index map (`_regroup_links`).

    1 ↔ 1 groups link; k → 1 groups make the output axis a Kron of the inputs (flatten);
    1 → k groups make the input axis a Kron of the outputs (heads × head_dim); k ↔ m groups
    (patch unfolding: H → h × ph, then B·C·h) are split into their common factors.
    """
    si, so = op.shape(src), op.shape()
    ins = [d for d, s in enumerate(si) if s != 1]
    outs = [d for d, s in enumerate(so) if s != 1]
    i = j = 0
    while i < len(ins) and j < len(outs):
        gi, gj = [ins[i]], [outs[j]]
        pi, pj = si[ins[i]], so[outs[j]]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(ins[i])
                pi *= si[ins[i]]
            else:
                j += 1
                gj.append(outs[j])
                pj *= so[outs[j]]
        i += 1
        j += 1
        yield from _regroup_links(op, src, gi, gj)


def _spans(shape: tuple[int, ...], group: list[int]) -> dict[tuple[int, int], int]:
    """(stride, stride · size) of each axis of a row-major group -> the axis."""
    spans, stride = {}, 1
    for d in reversed(group):
        spans[(stride, stride * shape[d])] = d
        stride *= shape[d]
    return spans


def _regroup_links(op: Op, src: Any, gi: list[int], gj: list[int]) -> Iterator[Link]:
    """One group of a reshape, as an index map: cut both sides at every axis boundary (strides);
    when the cuts divide each other, every axis is the row-major product of the factors
    between its cuts. A factor that is a whole axis on the other side links to it; any other
    factor (h of H = h × ph) is a bare width that keeps the identity. Else the group is frozen."""
    si, so = op.shape(src), op.shape()
    a_in, a_out = _spans(si, gi), _spans(so, gj)
    cuts = sorted({c for span in (*a_in, *a_out) for c in span})
    if any(b % a for a, b in zip(cuts, cuts[1:])):
        why = f"reshape {si} -> {so} regroups axes {gi} -> {gj}"
        for d in gi:
            yield Freeze(NodeAxis(src.name, d), why)
        for d in gj:
            yield Freeze(NodeAxis(op.node.name, d), why)
        return
    sides = ((src.name, a_in, op.node.name, a_out), (op.node.name, a_out, src.name, a_in))
    for name, own, other_name, other in sides:
        for (lo, hi), d in own.items():
            factors = [(a, b) for a, b in zip(cuts, cuts[1:]) if lo <= a and b <= hi][::-1]
            if len(factors) > 1:
                yield Kron(NodeAxis(name, d), tuple(
                    NodeAxis(other_name, other[f]) if f in other else f[1] // f[0]
                    for f in factors))
            elif name == src.name and (lo, hi) in other:
                yield Same(NodeAxis(name, d), NodeAxis(other_name, other[(lo, hi)]))


@register(nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
          "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
          "reshape_as")
def _reshape(op: Op) -> Iterator[Link]:
    src = op.node.args[0]
    if op.name in ("view_as", "reshape_as"):
        yield from keep_all(op, op.node.args[1])
    yield from _reshape_links(op, src)


@register(torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
          "permute", "transpose", "swapaxes", "movedim", "t")
def _permute(op: Op) -> Iterator[Link]:
    """Relabel axes: output axis k is input axis order[k]."""
    src = op.node.args[0]
    n = ndim(op, src)
    rest = list(op.node.args[1:])
    name = op.name
    if name == "permute":
        order = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        order = [int(d) % n for d in (order or op.node.kwargs.get("dims", []))]
    elif name in ("t",):
        order = list(range(n))[::-1]
    else:
        a = rest[0] if rest else op.node.kwargs.get("dim0", op.node.kwargs.get("source"))
        b = rest[1] if len(rest) > 1 else op.node.kwargs.get("dim1", op.node.kwargs.get(
            "destination"))
        if name == "movedim":
            order = list(range(n))
            order.pop(a % n)
            order.insert(b % n, a % n)
        else:
            order = list(range(n))
            order[a % n], order[b % n] = order[b % n], order[a % n]
    for k, d in enumerate(order):
        yield Same(op.x(src, d), op.out(k))


@register(torch.cat, torch.concat, torch.concatenate)
def _cat(op: Op) -> Iterator[Link]:
    """Non-cat axes pass through; the cat axis is a concatenation of the inputs' axes. A 1-D
    empty tensor is skipped, as torch.cat skips it (an empty cache concatenated to keys)."""
    tensors = [t for t in op.arg(0, "tensors") if tuple(op.shape(t) or ()) != (0,)]
    n = ndim(op, op.node)
    dim = op.arg(1, "dim", 0) % n
    for d in range(n):
        if d != dim or len(tensors) == 1:
            yield Same(op.out(d), *(op.x(t, d) for t in tensors))
    if len(tensors) > 1:
        yield Cat(NodeAxis(op.node.name, dim),
                  tuple(op.x(t, dim) or op.shape(t)[dim] for t in tensors))


@register(torch.stack)
def _stack(op: Op) -> Iterator[Link]:
    """The new axis indexes the inputs (not a channel axis, so frozen); others pass through."""
    tensors = list(op.arg(0, "tensors"))
    n = ndim(op, op.node)
    dim = op.arg(1, "dim", 0) % n
    for d in range(n):
        if d < dim:
            yield Same(op.out(d), *(op.x(t, d) for t in tensors))
        elif d > dim:
            yield Same(op.out(d), *(op.x(t, d - 1) for t in tensors))


@register(torch.split, torch.chunk, torch.tensor_split, torch.unbind,
          "split", "chunk", "tensor_split", "unbind")
def _split(op: Op) -> Iterator[Link]:
    """Pieces `node#i`; the split axis of the input is the concatenation of the pieces' axes."""
    src = op.node.args[0]
    n = ndim(op, src)
    name = op.name
    default_dim = 0
    dim = op.arg(2, "dim", default_dim) if name in (
        "split", "chunk", "tensor_split", "split_with_sizes") else op.arg(
        1, "dim", default_dim)
    dim = dim % n
    pieces = op._shapes.get(op.node.name) or ()
    if name == "unbind":
        for k in range(len(pieces)):
            for d in range(n):
                if d != dim:
                    yield Same(op.x(src, d), _piece(op, k, d - (d > dim)))
        return
    for k in range(len(pieces)):
        for d in range(n):
            if d != dim:
                yield Same(op.x(src, d), _piece(op, k, d))
    yield Cat(NodeAxis(src.name, dim), tuple(_piece(op, k, dim) or pieces[k][dim]
                                             for k in range(len(pieces))))


def _piece(op: Op, k: int, d: int) -> NodeAxis | None:
    s = op._shapes[op.node.name][k]
    return None if s[d] == 1 else NodeAxis(f"{op.node.name}#{k}", d)


@register(operator.getitem)
def _getitem(op: Op) -> Iterator[Link]:
    """Pick a piece of a tuple (split, chunk) or index a tensor with slices, ints, None, ..."""
    src, idx = op.node.args[0], op.arg(1)
    src_shape = op._shapes.get(src.name) if isinstance(src, fx.Node) else None
    if src_shape is None:
        return
    if not all(isinstance(s, int) for s in src_shape):  # a tuple of tensors
        idx %= len(src_shape)  # pieces[-1] is piece n-1: one name per piece
        piece = src_shape[idx]
        if piece is not None and all(isinstance(w, int) for w in piece):  # not nested: links
            for d in range(len(piece)):
                if piece[d] != 1:
                    yield Same(NodeAxis(f"{src.name}#{idx}", d), op.out(d))
        return
    yield from _index_links(op, src, idx if isinstance(idx, tuple) else (idx,))


def index_axes(idx: tuple[Any, ...], n: int) -> Iterator[tuple[int | None, int, int, Any]]:
    """(position in `idx` or None where `...` stands, input axis, output axis, index) of each
    axis of an n-d tensor indexed by `idx` (basic indexing: ints, slices, None, ...)."""
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[tuple[int | None, Any]] = []
    for k, i in enumerate(idx):
        expanded.extend([(None, slice(None))] * (n - consumed) if i is Ellipsis else [(k, i)])
    if Ellipsis not in idx:
        expanded.extend([(None, slice(None))] * (n - consumed))
    d_in = d_out = 0
    for k, i in expanded:
        if i is not None:
            yield k, d_in, d_out, i
        d_in += i is not None
        d_out += not isinstance(i, int)


def _index_links(op: Op, src: fx.Node, idx: tuple[Any, ...]) -> Iterator[Link]:
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
        return  # advanced indexing: leave everything unmentioned (frozen)
    for _, d_in, d_out, i in index_axes(idx, len(op.shape(src))):
        if isinstance(i, int):
            a = op.x(src, d_in)
            if a is not None:
                yield Freeze(a, f"indexing picks position {i} of axis {d_in}")
        else:
            yield from _slice_links(op, src, d_in, i, op.out(d_out))


def _slice_links(op: Op, src: fx.Node, d: int, i: slice, piece: NodeAxis | None
                 ) -> Iterator[Link]:
    """A slice start:stop of axis `d` with step 1 (bounds may be negative or None) is an index
    map: the axis is a cat of the piece and what the slice leaves out (bare widths, which
    other slices of the same axis may claim). A step other than 1 or a bound that is not a
    literal freezes the axis."""
    a = op.x(src, d)
    bounds = (i.start, i.stop, i.step)
    if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
        if a is not None:
            yield Freeze(a, f"a slice of axis {d} whose bounds are not literals ({i})")
        return
    size = op.shape(src)[d]
    start, stop, step = i.indices(size)
    if step != 1:
        if a is not None:
            yield Freeze(a, f"a strided slice (step {step}) of axis {d} is no block of its units")
        return
    stop = max(start, stop)
    if (start, stop) == (0, size):
        yield Same(a, piece)
    elif a is not None:
        parts = (start, piece or (stop - start), size - stop)
        yield Cat(a, tuple(p for p in parts if p != 0))


@register(torch.narrow, "narrow")
def _narrow(op: Op) -> Iterator[Link]:
    """narrow(x, dim, start, length) is the slice x[..., start:start+length, ...]."""
    src = op.node.args[0]
    dim, start, length = op.arg(1, "dim"), op.arg(2, "start"), op.arg(3, "length")
    n = ndim(op, src)
    idx = [slice(None)] * n
    idx[dim % n] = slice(start, start + length)
    yield from _index_links(op, src, tuple(idx))


@register("expand", "expand_as", "repeat", "broadcast_to", torch.broadcast_to)
def _expand(op: Op) -> Iterator[Link]:
    """Right-aligned axes whose size is unchanged pass through; grown or new axes are frozen."""
    src = op.node.args[0]
    if op.name == "expand_as":
        yield from keep_all(op, op.node.args[1])
    si, so = op.shape(src), op.shape()
    for d in range(len(si)):
        e = d + len(so) - len(si)
        if e >= 0 and si[d] == so[e]:
            yield Same(op.x(src, d), op.out(e))


@register("get_attr")
def _get_attr(op: Op) -> Iterator[Link]:
    """A parameter read in the graph: node axis d ~ parameter axis d (role set by its users)."""
    t = get_attr_tensor(op, op.node)
    if t is None:
        return
    if op.node.users and all(is_metadata(u) for u in op.node.users):
        yield from keep_all(op, op.node)  # only its shape or dtype is read: not data
        return
    roles = weight_roles(op.node, op._shapes)  # a weight standardised or scaled before use
    for d in range(t.dim()):
        if t.shape[d] != 1:
            yield Same(NodeAxis(op.node.name, d),
                       ParamAxis(op.node.target, d, roles.get(d, "auto")))

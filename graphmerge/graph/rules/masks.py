"""Axis rules of the ops transformers use for masks and positions: comparisons, integer
arithmetic, cumulative sums, triangles, gathers, padding, index tensors.

Only tensors that carry channel axes are linked; along the axis such an op scans, shifts,
gathers or pads, positions are not interchangeable, so that axis is left unmentioned (frozen).
Index-valued tensors (positions, token ids, masks) carry no free axes: they trace back to the
graph inputs or to constants, which are frozen or kept.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from graphmerge.graph.axes import Keep, Kron, Link, Same
from graphmerge.graph.rules.registry import Op, broadcast, ndim, register

aten = torch.ops.aten

_COMPARE_AND_INTEGER = (
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.mod,
    operator.floordiv, operator.and_, operator.or_, operator.xor, operator.invert,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.remainder, torch.fmod,
    torch.floor_divide, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.logical_xor, torch.bitwise_and, torch.bitwise_or, torch.bitwise_not, torch.isnan,
    torch.isinf, torch.isfinite, torch.sign, torch.floor, torch.ceil, torch.round, torch.trunc,
    "eq", "ne", "lt", "le", "gt", "ge", "remainder", "fmod", "floor_divide", "logical_and",
    "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__mod__", "__floordiv__",
    "__and__", "__or__", "__invert__", "isnan", "isinf", "isfinite", "sign", "floor", "ceil",
    "round", "trunc", "bool", "long", "int",
)
_ATEN_COMPARE_AND_INTEGER = [
    getattr(getattr(aten, name), overload)
    for name in ("eq", "ne", "lt", "le", "gt", "ge", "remainder", "fmod", "floor_divide",
                 "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
                 "bitwise_or", "bitwise_not", "__and__", "__or__", "isnan", "isinf",
                 "isfinite", "sign", "floor", "ceil", "round", "trunc")
    for overload in ("Tensor", "Scalar", "default")
    if hasattr(getattr(aten, name), overload)
]


@register(*_COMPARE_AND_INTEGER, *_ATEN_COMPARE_AND_INTEGER)
def _elementwise(op: Op) -> Iterator[Link]:
    """Position-wise comparisons and integer arithmetic, with broadcasting."""
    yield from broadcast(op, op.tensor_args())


_ALONG_ONE_AXIS = (torch.cumsum, torch.cumprod, "cumsum", "cumprod", aten.cumsum.default,
                   aten.cumprod.default, torch.diff, "diff", aten.diff.default)


@register(*_ALONG_ONE_AXIS)
def _scan(op: Op) -> Iterator[Link]:
    """cumsum(x, dim), diff(x, n, dim): other axes pass through; the scanned axis is not
    permutable."""
    x = op.arg(0, "input")
    n = ndim(op, x)
    dim = (op.arg(2, "dim", -1) if op.name == "diff" else op.arg(1, "dim")) % n
    if ndim(op, op.node) != n:
        return
    for d in range(n):
        if d != dim:
            yield Same(op.x(x, d), op.out(d))


@register(torch.triu, torch.tril, "triu", "tril", aten.triu.default, aten.tril.default)
def _triangle(op: Op) -> Iterator[Link]:
    """triu/tril act on the last two axes (not permutable); batch axes pass through."""
    x = op.arg(0, "input")
    for d in range(ndim(op, x) - 2):
        yield Same(op.x(x, d), op.out(d))


@register(torch.gather, "gather", aten.gather.default)
def _gather(op: Op) -> Iterator[Link]:
    """out[..., j, ...] = x[..., index[..., j, ...], ...] along `dim`; other axes of x, index
    and out line up."""
    x, dim, index = op.arg(0, "input"), op.arg(1, "dim"), op.arg(2, "index")
    n = ndim(op, x)
    dim %= n
    for d in range(n):
        if d != dim and op.shape(x)[d] == op.shape()[d]:
            yield Same(op.x(x, d), op.x(index, d), op.out(d))


@register(torch.index_select, "index_select", aten.index_select.default)
def _index_select(op: Op) -> Iterator[Link]:
    """index_select(x, dim, index): other axes pass through; the selected axis is not
    permutable (the index names positions of it)."""
    x, dim = op.arg(0, "input"), op.arg(1, "dim")
    n = ndim(op, x)
    dim %= n
    for d in range(n):
        if d != dim:
            yield Same(op.x(x, d), op.out(d))
    yield from _keep_index(op, op.arg(2, "index"))


@register(torch.repeat_interleave, "repeat_interleave", aten.repeat_interleave.self_int,
          aten.repeat_interleave.self_Tensor)
def _repeat_interleave(op: Op) -> Iterator[Link]:
    """Each unit repeated k times: the output axis is the row-major product of the input axis
    and k copies (grouped-query attention's keys); repeats given per unit grow the axis
    unevenly (frozen). Other axes pass through."""
    x, repeats = op.arg(0, "input"), op.arg(1, "repeats")
    dim = op.arg(2, "dim")
    n = ndim(op, x)
    if dim is None or n != ndim(op, op.node):
        return  # flattened: everything unmentioned, hence frozen
    dim %= n
    for d in range(n):
        if d != dim:
            yield Same(op.x(x, d), op.out(d))
    if isinstance(repeats, int) and op.x(x, dim) is not None:
        yield Kron(op.out(dim), (op.x(x, dim), repeats))


@register(F.pad, aten.pad.default, aten.constant_pad_nd.default)
def _pad(op: Op) -> Iterator[Link]:
    """Padded axes change size (not permutable); unpadded axes pass through."""
    x, pad = op.arg(0, "input"), op.arg(1, "pad")
    n = ndim(op, x)
    padded = {n - 1 - k // 2 for k, p in enumerate(pad) if p != 0}
    for d in range(n):
        if d not in padded:
            yield Same(op.x(x, d), op.out(d))


@register(aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
          aten.scalar_tensor.default, aten.new_ones.default, aten.new_zeros.default,
          aten.new_full.default, aten.new_empty.default, "new_zeros", "new_ones", "new_full",
          "new_empty")
def _uniform_constant(op: Op) -> Iterator[Link]:
    """A tensor filled with one value (`new_ones(x, size)` reads only x's dtype and device): no
    permutation of its axes changes it."""
    for t in op.tensor_args():
        yield from _keep_index(op, t)
    yield from _keep_index(op, op.node)


@register(torch.arange, aten.arange.default, aten.arange.start, aten.arange.start_step)
def _positions(op: Op) -> Iterator[Link]:
    """Positions 0, 1, 2, ...: every axis of the result is ordered (unmentioned: frozen)."""
    return iter(())


def _keep_index(op: Op, t: object) -> Iterator[Link]:
    for d in range(ndim(op, t)):
        a = op.x(t, d)
        if a is not None:
            yield Keep(a)


@register(aten.index.Tensor)
def _advanced_index(op: Op) -> Iterator[Link]:
    """x[idx, ...] with index tensors picks positions: every axis it touches stays frozen."""
    return iter(())

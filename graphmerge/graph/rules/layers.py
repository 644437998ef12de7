"""Axis rules of ops with weights: linear, conv, matmul, attention, embedding."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphmerge.graph.axes import AxisRef, FactorAxis, Freeze, Keep, Kron, Link, NodeAxis, Role, Same
from graphmerge.graph.rules.registry import (
    Op,
    functional_param,
    ndim,
    pass_through,
    register,
)

# ---- linear maps --------------------------------------------------------------------------


@register(nn.Linear)
def _linear(op: Op) -> Iterator[Link]:
    x = op.node.args[0]
    n = ndim(op, x)
    for d in range(n - 1):
        yield Same(op.x(x, d), op.out(d))
    yield Same(op.x(x, -1), op.p("weight", 1, "in"))
    yield Same(op.out(-1), op.p("weight", 0, "out"), op.p("bias", 0, "out"))


@register(nn.Bilinear)
def _bilinear(op: Op) -> Iterator[Link]:
    a, b = op.node.args[0], op.node.args[1]
    for d in range(ndim(op, a) - 1):
        yield Same(op.x(a, d), op.x(b, d), op.out(d))
    yield Same(op.x(a, -1), op.p("weight", 1, "in"))
    yield Same(op.x(b, -1), op.p("weight", 2, "in"))
    yield Same(op.out(-1), op.p("weight", 0, "out"), op.p("bias", 0, "out"))


@register(F.bilinear)
def _f_bilinear(op: Op) -> Iterator[Link]:
    """F.bilinear(a, b, weight [out, in1, in2], bias): as nn.Bilinear."""
    a, b = op.arg(0, "input1"), op.arg(1, "input2")
    w, bias = op.arg(2, "weight"), op.arg(3, "bias")
    for d in range(ndim(op, a) - 1):
        yield Same(op.x(a, d), op.x(b, d), op.out(d))
    yield Same(op.x(a, -1), functional_param(op, w, 1, "in"), op.x(w, 1))
    yield Same(op.x(b, -1), functional_param(op, w, 2, "in"), op.x(w, 2))
    yield Same(op.out(-1), functional_param(op, w, 0, "out"), op.x(w, 0),
               functional_param(op, bias, 0, "out"), op.x(bias, 0))


def _conv_links(op: Op, x: Any, w: Any, b: Any, groups: int, transposed: bool,
                wax: Callable[[int, Role], AxisRef | None],
                bax: Callable[[int, Role], AxisRef | None]) -> Iterator[Link]:
    """Shared by module and functional convolutions; `wax`/`bax` give weight/bias axes."""
    yield Same(op.x(x, 0), op.out(0))  # batch
    cin, cout = op.shape(x)[1], op.shape()[1]
    if groups == 1:
        w_in, w_out = (0, 1) if transposed else (1, 0)
        yield Same(op.x(x, 1), wax(w_in, "in"))
        yield Same(op.out(1), wax(w_out, "out"), bax(0, "out"))
    elif groups == cin == cout and not transposed:
        yield Same(op.x(x, 1), op.out(1), wax(0, "out"), bax(0, "out"))
    elif isinstance(groups, int) and groups > 1 and cin % groups == 0 == cout % groups:
        yield from _grouped_conv_links(op, x, groups, transposed, wax, bax)
    else:
        why = f"grouped convolution (groups={groups}, {cin}→{cout} channels) has no rule"
        for a in (op.x(x, 1), op.out(1)):
            if a is not None:
                yield Freeze(a, why)


def group_links(op: Op, whole: AxisRef | None, groups: FactorAxis, tag: str, size: int
                ) -> Iterator[Link]:
    """`whole` (a channel axis of groups · size units, group-major) as the product of the
    groups and the units of one group (a `FactorAxis` tagged `tag`); a group of one unit
    is the groups themselves. Returns nothing for a missing axis."""
    if whole is None:
        return
    if size == 1:
        yield Same(whole, groups)
    else:
        yield Kron(whole, (groups, FactorAxis(op.node.name, tag, size)))


def _grouped_conv_links(op: Op, x: Any, groups: int, transposed: bool,
                        wax: Callable[[int, Role], AxisRef | None],
                        bax: Callable[[int, Role], AxisRef | None]) -> Iterator[Link]:
    """A grouped convolution: output group g reads input group g only, so both channel axes
    are groups × units of one group (the same groups); the weight [C_out, C_in/g, ...]
    (transposed: [C_in, C_out/g, ...]) reads the input's units of one group on axis 1 (writes
    the output's), the same in every group. A valid transform moves whole groups, and the
    units inside the groups."""
    cin, cout = op.shape(x)[1], op.shape()[1]
    g = FactorAxis(op.node.name, "groups", groups)
    ki, ko = cin // groups, cout // groups
    yield from group_links(op, op.x(x, 1), g, "in", ki)
    yield from group_links(op, op.out(1), g, "out", ko)
    if transposed:
        yield Same(op.x(x, 1), wax(0, "in"))
        yield Same(op.out(1), bax(0, "out"))
        if ko > 1:
            yield Same(FactorAxis(op.node.name, "out", ko), wax(1, "out"))
    else:
        yield Same(op.out(1), wax(0, "out"), bax(0, "out"))
        if ki > 1:
            yield Same(FactorAxis(op.node.name, "in", ki), wax(1, "in"))


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
def _conv(op: Op) -> Iterator[Link]:
    """Channels link through weights; spatial axes are left unmentioned, hence frozen."""
    m = op.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    yield from _conv_links(op, op.node.args[0], None, None, m.groups, transposed,
                           lambda d, r: op.p("weight", d, r), lambda d, r: op.p("bias", d, r))



@register(F.linear)
def _f_linear(op: Op) -> Iterator[Link]:
    x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
    for d in range(ndim(op, x) - 1):
        yield Same(op.x(x, d), op.out(d))
    yield Same(op.x(x, -1), functional_param(op, w, 1, "in"), op.x(w, 1))
    yield Same(op.out(-1), functional_param(op, w, 0, "out"), op.x(w, 0),
               functional_param(op, b, 0, "out"), op.x(b, 0))


@register(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
          F.conv_transpose3d)
def _f_conv(op: Op) -> Iterator[Link]:
    x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
    transposed = "transpose" in op.name
    groups = op.arg(6, "groups", 1)
    for t in (w, b):  # channel axes link through the parameter; kernel positions must not move
        for d in range(ndim(op, t)):
            a = op.x(t, d)
            if a is not None:
                yield Keep(a) if d < 2 else Freeze(a, "convolution kernel positions")
    yield from _conv_links(op, x, w, b, groups, transposed,
                           lambda d, r: functional_param(op, w, d, r),
                           lambda d, r: functional_param(op, b, d, r))


def _matmul_links(op: Op, a: Any, b: Any) -> Iterator[Link]:
    """a [..., n, k] @ b [..., k, m] -> [..., n, m]; batch axes broadcast."""
    na, nb, n = ndim(op, a), ndim(op, b), ndim(op, op.node)
    if na < 2 or nb < 2:
        for t in (a, b):
            for d in range(ndim(op, t)):
                if op.x(t, d) is not None:
                    yield Freeze(op.x(t, d), "matmul with a 1-D operand has no rule")
        return
    yield Same(*_operand(op, a, na - 1, "in"), *_operand(op, b, nb - 2, "in"))
    yield Same(*_operand(op, a, na - 2, "out"), op.out(n - 2))
    yield Same(*_operand(op, b, nb - 1, "out"), op.out(n - 1))
    for d in range(n - 2):  # batch axes, right-aligned
        axes = [op.out(d)]
        for t, k in ((a, na), (b, nb)):
            if d - (n - k) >= 0:
                axes.extend(_operand(op, t, d - (n - k), "out"))
        yield Same(*axes)


def _operand(op: Op, t: Any, d: int, role: Role) -> tuple[AxisRef | None, ...]:
    """A matmul operand's axis; a parameter operand contracted over reads (`in`) its space."""
    if isinstance(t, fx.Node) and t.op == "get_attr":
        return (functional_param(op, t, d, role), op.x(t, d))
    return (op.x(t, d),)


@register(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__")
def _matmul(op: Op) -> Iterator[Link]:
    yield from _matmul_links(op, op.node.args[0], op.node.args[1])


@register(torch.einsum)
def _einsum(op: Op) -> Iterator[Link]:
    """One letter, one transform: every axis a letter names (in the operands and the output)
    is linked; a letter summed over is contracted, so a weight operand reads its space (`in`),
    as in matmul. Ellipses and letters repeated within one operand (diagonals) are left
    unmentioned (frozen)."""
    equation = op.arg(0, "equation")
    rest = op.node.args[1:]
    operands = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != len(operands) or any(len(set(t)) != len(t) for t in terms):
        return
    for letter in dict.fromkeys(inputs.replace(",", "") + output):
        role: Role = "out" if letter in output else "in"
        axes = [op.out(output.index(letter))] if letter in output else []
        for term, t in zip(terms, operands):
            if letter in term:
                axes.extend(_operand(op, t, term.index(letter), role))
        yield Same(*axes)


@register(F.scaled_dot_product_attention)
def _sdpa(op: Op) -> Iterator[Link]:
    """q [..., L, E], k [..., S, E], v [..., S, Ev] -> [..., L, Ev]; mask broadcast to [..., L, S]."""
    q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
    n = ndim(op, q)
    yield Same(op.x(q, -1), op.x(k, -1))
    yield Same(op.x(v, -1), op.out(-1))
    yield Same(op.x(q, -2), op.out(-2))
    yield Same(op.x(k, -2), op.x(v, -2))
    for d in range(n - 2):
        yield Same(op.x(q, d), op.x(k, d), op.x(v, d), op.out(d))
    mask = op.arg(3, "attn_mask")
    if isinstance(mask, fx.Node) and op.is_tensor(mask):
        m = ndim(op, mask)
        if m >= 1:
            yield Same(op.x(mask, m - 1), op.x(k, -2))
        if m >= 2:
            yield Same(op.x(mask, m - 2), op.x(q, -2))
        for d in range(m - 2):
            yield Same(op.x(mask, d), op.out(d + n - m))




@register(nn.Embedding)
def _embedding(op: Op) -> Iterator[Link]:
    """Output [*idx, D]: index axes pass through, D ~ weight axis 1 (out)."""
    idx = op.node.args[0]
    yield from pass_through(op, idx)
    yield Same(op.out(-1), op.p("weight", 1, "out"))


@register(F.embedding)
def _f_embedding(op: Op) -> Iterator[Link]:
    yield from embedding_links(op, op.arg(0, "input"), op.arg(1, "weight"))


def embedding_links(op: Op, idx: Any, w: Any) -> Iterator[Link]:
    """A lookup of weight rows by index: index axes pass through, D ~ weight axis 1 (out)."""
    yield from pass_through(op, idx)
    yield Same(op.out(-1), functional_param(op, w, 1, "out"), op.x(w, 1))
    if op.x(w, 0) is not None:
        yield Freeze(op.x(w, 0), "embedding rows are looked up by index")


@register(nn.MultiheadAttention)
def _multihead_attention(op: Op) -> Iterator[Link]:
    """query/key/value [.., E] are read by the input projection (in), the first output [.., E]
    is written by the output projection (out); the heads inside keep the identity."""
    m = op.module
    q, k, v = (op.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    out = NodeAxis(f"{op.node.name}#0", 0)
    pieces = op._shapes.get(op.node.name) or ()
    if not pieces or pieces[0] is None:
        return
    shape = pieces[0]

    def piece(d: int) -> NodeAxis | None:
        return None if shape[d] == 1 else NodeAxis(out.node, d)

    if m._qkv_same_embed_dim:
        yield Same(op.x(q, -1), op.x(k, -1), op.x(v, -1), op.p("in_proj_weight", 1, "in"))
    else:
        for t, w in ((q, "q_proj_weight"), (k, "k_proj_weight"), (v, "v_proj_weight")):
            yield Same(op.x(t, -1), op.p(w, 1, "in"))
    yield Same(piece(2), op.p("out_proj.weight", 0, "out"), op.p("out_proj.bias", 0, "out"))
    batch, seq = (0, 1) if m.batch_first else (1, 0)
    yield Same(op.x(q, batch), op.x(k, batch), op.x(v, batch), piece(batch))
    yield Same(op.x(q, seq), piece(seq))
    yield Same(op.x(k, seq), op.x(v, seq))

"""Axis rules of elementwise ops: activations, casts, arithmetic with broadcasting, constants."""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from graphmerge.graph.axes import Cat, Keep, Link, NodeAxis, Same
from graphmerge.graph.rules.registry import (
    Op,
    broadcast,
    functional_param,
    keep_all,
    ndim,
    pass_through,
    register,
)

aten = torch.ops.aten

# ---- elementwise --------------------------------------------------------------------------

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.LogSigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.RReLU, nn.FeatureAlphaDropout,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.softmax, F.log_softmax, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.erf, torch.sin, torch.cos,
    torch.square, torch.reciprocal, torch.clamp, torch.softmax, torch.log_softmax,
    torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.tanh, operator.neg,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.pow,
    F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_, F.tanhshrink, F.logsigmoid, F.hardshrink,
    F.softshrink, F.threshold, F.rrelu, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    F.softmin,
)
_UNARY_METHODS = (
    "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "erf", "square",
    "reciprocal", "clamp", "clamp_min", "clamp_max", "pow", "softmax", "log_softmax", "sin",
    "cos", "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "requires_grad_", "cpu",
)


@register(*dict.fromkeys((*_UNARY_MODULES, *_UNARY_FUNCTIONS, *_UNARY_METHODS)))
def _unary(op: Op) -> Iterator[Link]:
    """Position-wise (and softmax-like) ops: output axis d ~ input axis d.

    Extra tensor arguments (`type_as(y)`, `to(y)`) are read for dtype only. A tensor exponent or
    bound is treated as a broadcasting operand.
    """
    src = op.arg(0, "input")
    if op.node.op == "call_module":
        src = op.node.args[0]
    if op.module is not None and isinstance(op.module, nn.PReLU) and op.module.weight.numel() > 1:
        yield Same(op.x(src, 1), op.out(1), op.p("weight", 0, "out"))
    if op.name in ("type_as", "to", "_to_copy"):
        yield from pass_through(op, src)
        for t in op.tensor_args()[1:]:
            yield from keep_all(op, t)
        return
    yield from broadcast(op, op.tensor_args())
    if op.name in ("softmax", "log_softmax", "softmin", "Softmax", "LogSoftmax", "Softmin"):
        dim = op.module.dim if op.module is not None else op.arg(1, "dim")
        if isinstance(dim, int) and op.x(src, dim) is not None:
            yield Keep(op.x(src, dim), reduced=True)  # normalised over every unit of dim


@register(*dict.fromkeys((F.prelu, torch.prelu)))
def _prelu(op: Op) -> Iterator[Link]:
    """prelu(x, weight): a weight of C slopes is read along the channel axis 1 of x (out, as
    the affine of a norm); a single slope is applied everywhere."""
    x, w = op.arg(0, "input"), op.arg(1, "weight")
    yield from pass_through(op, x)
    if ndim(op, x) >= 2 and op.x(w, 0) is not None:
        yield Same(op.x(x, 1), op.out(1), functional_param(op, w, 0, "out"), op.x(w, 0))


@register(F.glu, nn.GLU)
def _glu(op: Op) -> Iterator[Link]:
    """glu(x, dim) = a · sigmoid(b) for the halves a, b of x along dim: output unit i pairs
    unit i of each half, so x's axis along dim is the output's, twice."""
    x = op.node.args[0] if op.module is not None else op.arg(0, "input")
    dim = op.module.dim if op.module is not None else op.arg(1, "dim", -1)
    n = ndim(op, x)
    dim %= n
    for d in range(n):
        if d != dim:
            yield Same(op.x(x, d), op.out(d))
    half = op.out(dim) or op.shape()[dim]
    yield Cat(NodeAxis(x.name, dim), (half, half))


_BINARY = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum, torch.where, torch.masked_fill, torch.lerp, torch.addcmul,
    "add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "masked_fill", "masked_fill_",
    "maximum", "minimum", "where", "lerp", "__add__", "__mul__", "__sub__", "__truediv__",
)


@register(*_BINARY)
def _binary(op: Op) -> Iterator[Link]:
    """add/sub/mul/div/where with broadcasting: ties residual branches into one space."""
    yield from broadcast(op, op.tensor_args())


try:  # the input checks torch.export adds to an unlifted module
    from torch.export._unlift import GuardsFn as _GuardsFn
except ImportError:  # pragma: no cover - other torch versions
    _GuardsFn = "_guards_fn"


_ASSERTS = (
    torch._assert, torch._assert_async, aten._assert_async.default, aten._assert_async.msg,
    aten._assert_scalar.default, aten._functional_assert_async.msg,
    aten._functional_assert_scalar.default, aten.sym_constrain_range.default,
    aten.sym_constrain_range_for_size.default,
)


@register("size", "dim", "numel", "nelement", getattr, "__len__", len, aten.sym_size.int,
          aten.sym_numel.default, aten.sym_stride.int, aten._assert_tensor_metadata.default,
          _GuardsFn, *_ASSERTS)
def _metadata(op: Op) -> Iterator[Link]:
    """Shape/dtype queries and assertions (`torch._assert(x.shape[1] == c, msg)`, export's
    guards and runtime asserts): read nothing that a permutation changes, so they link and
    freeze nothing. An asserted tensor condition is computed (and linked) by the ops before."""
    for t in op.tensor_args():
        yield from keep_all(op, t)


@register(torch.zeros, torch.ones, torch.full, torch.empty)
def _constant(op: Op) -> Iterator[Link]:
    """Constant-filled tensors are unchanged by any permutation of their axes."""
    for d in range(ndim(op, op.node)):
        a = op.out(d)
        if a is not None:
            yield Keep(a)

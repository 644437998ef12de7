"""Axis rules of the aten ops that `torch.export` graphs are made of.

Most aten ops take their arguments in the order of a torch function that already has a rule
(`aten.linear.default` ~ `F.linear`, `aten.view.default` ~ `Tensor.view`): those are aliases.
The few whose arguments differ (embedding, batch norm, slice, select, addmm) have rules here.
Parameters reach these ops as `get_attr` nodes, whose roles the functional rules declare.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from graphmerge.graph.axes import Link, Same
from graphmerge.graph.rules import elementwise, layers, norms  # noqa: F401  (aliased below)
from graphmerge.graph.rules.layers import embedding_links
from graphmerge.graph.rules.norms import channel_norm_links, channel_params, stats_axes
from graphmerge.graph.rules.registry import (
    Op,
    alias,
    functional_param,
    ndim,
    register,
)
from graphmerge.graph.rules.shape import _index_links

aten = torch.ops.aten


def _overloads(name: str) -> list[torch._ops.OpOverload]:
    packet = getattr(aten, name, None)
    return [] if packet is None else [getattr(packet, o) for o in packet.overloads()]


# aten op (every overload) -> a key with a rule and the same argument order
_SAME_AS: dict[str, tuple[object, ...]] = {
    # layers
    "linear": (F.linear,), "conv1d": (F.conv1d,), "conv2d": (F.conv2d,), "conv3d": (F.conv3d,),
    "conv_transpose1d": (F.conv_transpose1d,), "conv_transpose2d": (F.conv_transpose2d,),
    "conv_transpose3d": (F.conv_transpose3d,), "matmul": (torch.matmul,), "bmm": (torch.bmm,),
    "mm": (torch.mm,), "einsum": (torch.einsum,),
    "scaled_dot_product_attention": (F.scaled_dot_product_attention,),
    "layer_norm": (F.layer_norm,), "rms_norm": (F.rms_norm,), "group_norm": (F.group_norm,),
    # elementwise
    **{name: (getattr(torch, name),) for name in (
        "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "erf", "sin",
        "cos", "square", "reciprocal", "clamp", "softmax", "log_softmax", "zeros_like",
        "ones_like", "full_like", "empty_like", "pow")},
    **{name: (getattr(F, name),) for name in (
        "gelu", "silu", "mish", "elu", "selu", "celu", "leaky_relu", "hardswish", "hardsigmoid",
        "hardtanh", "softplus", "dropout", "glu", "relu6", "rrelu", "hardshrink", "softshrink",
        "threshold", "alpha_dropout", "feature_alpha_dropout", "elu_", "leaky_relu_",
        "hardtanh_", "bilinear")},
    "log_sigmoid": (F.logsigmoid,), "feature_dropout": (F.dropout2d,),
    "prelu": (torch.prelu,), "_prelu_kernel": (torch.prelu,),
    "relu_": (torch.relu,), "clamp_min": ("clamp_min",), "clamp_max": ("clamp_max",),
    "clone": ("clone",), "contiguous": ("contiguous",), "alias": ("clone",),
    "detach": ("detach",), "to": ("to",), "_to_copy": ("to",), "type_as": ("type_as",),
    "add": (operator.add,), "add_": (operator.add,), "sub": (operator.sub,),
    "rsub": (operator.sub,), "mul": (operator.mul,), "mul_": (operator.mul,),
    "div": (operator.truediv,), "div_": (operator.truediv,), "maximum": (torch.maximum,),
    "minimum": (torch.minimum,), "where": (torch.where,), "masked_fill": (torch.masked_fill,),
    "masked_fill_": (torch.masked_fill,), "lerp": (torch.lerp,), "addcmul": (torch.addcmul,),
    # reductions and pooling
    **{name: (getattr(torch, name),) for name in (
        "sum", "mean", "amax", "amin", "std", "var", "logsumexp", "prod", "var_mean",
        "std_mean")},
    **{name: (getattr(F, name),) for name in (
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")},
    **{name: (F.interpolate,) for name in (
        "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
        "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
        "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d",
        "_upsample_nearest_exact2d", "_upsample_nearest_exact3d")},
    # shapes
    "view": ("view",), "_unsafe_view": ("view",), "reshape": ("reshape",),
    "reshape_as": ("reshape_as",), "view_as": ("view_as",), "flatten": ("flatten",),
    "unflatten": ("unflatten",), "squeeze": ("squeeze",),
    "unsqueeze": ("unsqueeze",), "permute": ("permute",), "transpose": ("transpose",),
    "t": ("t",), "expand": ("expand",), "cat": (torch.cat,), "concat": (torch.cat,),
    "stack": (torch.stack,), "split": ("split",), "split_with_sizes": ("split",),
    "chunk": ("chunk",), "tensor_split": ("tensor_split",), "unbind": ("unbind",),
    "narrow": ("narrow",),
}
for _name, _keys in _SAME_AS.items():
    for _overload in _overloads(_name):
        alias(_overload, *_keys)


alias(aten.min.other, torch.minimum)
alias(aten.max.other, torch.maximum)


@register(aten.embedding.default)
def _embedding(op: Op) -> Iterator[Link]:
    """aten.embedding(weight, indices): index axes pass through, D ~ weight axis 1 (out)."""
    yield from embedding_links(op, op.arg(1, "indices"), op.arg(0, "weight"))


@register(aten.batch_norm.default, aten.instance_norm.default,
          aten._native_batch_norm_legit_no_training.default)
def _batch_norm(op: Op) -> Iterator[Link]:
    """aten.batch_norm / aten.instance_norm(x, weight, bias, running_mean, running_var, flag,
    ...): channel axis 1 ~ affine parameters and running statistics (out); other axes pass
    through. The flag (training, use_input_stats) is absent from the no-training form."""
    x = op.arg(0, "input")
    params = channel_params(op, [op.arg(k) for k in range(1, 5)])
    instance = op.name == "instance_norm"
    flag = op.arg(5) if op.name in ("batch_norm", "instance_norm") else False
    yield from channel_norm_links(op, x, params, stats_axes(op, x, flag, instance))


@register(aten.addmm.default)
def _addmm(op: Op) -> Iterator[Link]:
    """addmm(bias, a [n, k], b [k, m]) = bias + a @ b: k is read through b (in), m is written by
    b and the bias (out)."""
    bias, a, b = op.arg(0), op.arg(1), op.arg(2)
    yield Same(op.x(a, 0), op.out(0))
    yield Same(op.x(a, 1), functional_param(op, b, 0, "in"), op.x(b, 0))
    yield Same(op.out(1), functional_param(op, b, 1, "out"), op.x(b, 1),
               functional_param(op, bias, ndim(op, bias) - 1, "out"), op.x(bias, -1))


@register(aten.slice.Tensor)
def _slice(op: Op) -> Iterator[Link]:
    """slice(x, dim, start, end, step) is x[..., start:end:step, ...]."""
    x = op.arg(0)
    n = ndim(op, x)
    dim, start, end, step = op.arg(1, "dim", 0), op.arg(2, "start"), op.arg(3, "end"), op.arg(
        4, "step", 1)
    size = op.shape(x)[dim % n]
    idx = [slice(None)] * n
    if isinstance(end, int) and end > size:  # export writes "to the end" as 2**63 - 1
        end = size
    idx[dim % n] = slice(start, end, step)
    yield from _index_links(op, x, tuple(idx))


@register(aten.select.int)
def _select(op: Op) -> Iterator[Link]:
    """select(x, dim, index) is x[..., index, ...]."""
    x = op.arg(0)
    n = ndim(op, x)
    idx = [slice(None)] * n
    idx[op.arg(1) % n] = op.arg(2)
    yield from _index_links(op, x, tuple(idx))

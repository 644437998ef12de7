"""Axis rules of normalisations: batch/instance norm, layer/RMS norm, group norm."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphmerge.graph.axes import AxisRef, Freeze, Keep, Link, Same
from graphmerge.graph.rules.registry import (
    Op,
    functional_param,
    keep_all,
    ndim,
    register,
)

# ---- norms and embeddings -----------------------------------------------------------------


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)
def _batch_norm(op: Op) -> Iterator[Link]:
    """Channel axis 1 ~ affine parameters and running statistics; other axes pass through."""
    x = op.node.args[0]
    for d in range(ndim(op, x)):
        if d == 1:
            yield Same(op.x(x, 1), op.out(1), *(op.p(n, 0, "out") for n in
                       ("weight", "bias", "running_mean", "running_var")))
        else:
            yield Same(op.x(x, d), op.out(d))


def _norm_last(op: Op, x: Any, k: int, params: Sequence[Callable[[int], AxisRef | None]]
               ) -> Iterator[Link]:
    """Normalisation over the last `k` axes, with elementwise affine parameters on them."""
    n = ndim(op, x)
    for d in range(n):
        j = d - (n - k)
        yield Same(op.x(x, d), op.out(d), *((f(j) for f in params) if j >= 0 else ()))
        if j >= 0 and op.x(x, d) is not None:
            yield Keep(op.x(x, d), reduced=True)  # its statistics read every unit


@register(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(op: Op) -> Iterator[Link]:
    k = len(op.module.normalized_shape)
    yield from _norm_last(op, op.node.args[0], k,
                          [lambda j: op.p("weight", j, "out"), lambda j: op.p("bias", j, "out")])


@register(F.layer_norm, F.rms_norm)
def _f_layer_norm(op: Op) -> Iterator[Link]:
    x, shape = op.arg(0, "input"), op.arg(1, "normalized_shape")
    w, b = op.arg(2, "weight"), op.arg(3, "bias")
    if op.name == "rms_norm":
        w, b = op.arg(2, "weight"), None
    for t in (w, b):
        if isinstance(t, fx.Node):
            yield from keep_all(op, t)
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    yield from _norm_last(op, x, k, [
        lambda j: functional_param(op, w, j, "out") or op.x(w, j),
        lambda j: functional_param(op, b, j, "out") or op.x(b, j),
    ])


@register(nn.GroupNorm, F.group_norm, nn.LocalResponseNorm)
def _frozen_norm(op: Op) -> Iterator[Link]:
    """Group-structured channels need a block-constrained matcher, which does not exist yet."""
    for t in [*op.tensor_args(), op.node]:
        for d in range(ndim(op, t)):
            a = op.x(t, d)
            if a is not None:
                yield Freeze(a, f"{op.name} groups channels; no block-constrained matcher yet")

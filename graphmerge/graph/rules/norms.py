"""Axis rules of normalisations: batch/instance norm, layer/RMS norm, group norm (modules and
their functional forms)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphmerge.graph.axes import AxisRef, FactorAxis, Freeze, Keep, Link, Same
from graphmerge.graph.rules.layers import group_links
from graphmerge.graph.rules.registry import (
    Op,
    functional_param,
    keep_all,
    ndim,
    register,
)

__all__ = ["channel_norm_links", "channel_params", "stats_axes", "group_norm_links"]

# ---- norms and embeddings -----------------------------------------------------------------


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)
def _batch_norm(op: Op) -> Iterator[Link]:
    """Channel axis 1 ~ affine parameters and running statistics; other axes pass through."""
    yield from channel_norm_links(op, op.node.args[0], [op.p(n, 0, "out") for n in (
        "weight", "bias", "running_mean", "running_var")])


def channel_norm_links(op: Op, x: Any, params: Iterable[AxisRef | None],
                       reduced: Iterable[int] = ()) -> Iterator[Link]:
    """A per-channel normalisation (batch or instance norm) of `x` [N, C, ...]: the channel
    axis 1 ~ the output's and `params` (affine values and running statistics); every other
    axis passes through. The axes in `reduced` are those the statistics are computed over
    (batch in training, spatial in instance norm): their units are read together."""
    for d in range(ndim(op, x)):
        if d == 1:
            yield Same(op.x(x, 1), op.out(1), *params)
        else:
            yield Same(op.x(x, d), op.out(d))
        if d in reduced and op.x(x, d) is not None:
            yield Keep(op.x(x, d), reduced=True)


def channel_params(op: Op, tensors: Iterable[Any]) -> list[AxisRef | None]:
    """Axis 0 of the per-channel tensors a functional norm takes (`get_attr` parameters with
    the role `out`, or computed values); None entries (no affine, no running statistics)
    are skipped."""
    return [a for t in tensors for a in (functional_param(op, t, 0, "out"), op.x(t, 0))]


@register(F.batch_norm, F.instance_norm)
def _f_batch_norm(op: Op) -> Iterator[Link]:
    """F.batch_norm / F.instance_norm(x, running_mean, running_var, weight, bias, flag, ...):
    as the modules (the flag is `training` or `use_input_stats`; statistics of the input are
    read over the batch, or over the spatial axes)."""
    x = op.arg(0, "input")
    params = channel_params(op, [op.arg(1, "running_mean"), op.arg(2, "running_var"),
                                 op.arg(3, "weight"), op.arg(4, "bias")])
    instance = op.name == "instance_norm"
    flag = op.arg(5, "use_input_stats" if instance else "training", instance)
    yield from channel_norm_links(op, x, params, stats_axes(op, x, flag, instance))


def stats_axes(op: Op, x: Any, flag: Any, instance: bool) -> list[int]:
    """Axes a batch/instance norm computes statistics over when `flag` (training or
    use_input_stats) is set: the batch axis, or the spatial axes."""
    if flag is not True:
        return []
    return list(range(2, ndim(op, x))) if instance else [0]


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


@register(nn.GroupNorm)
def _group_norm(op: Op) -> Iterator[Link]:
    yield from group_norm_links(op, op.node.args[0], op.module.num_groups,
                                [op.p("weight", 0, "out"), op.p("bias", 0, "out")])


@register(F.group_norm)
def _f_group_norm(op: Op) -> Iterator[Link]:
    """F.group_norm(x, num_groups, weight, bias, eps) (and aten.group_norm): as the module."""
    yield from group_norm_links(op, op.arg(0, "input"), op.arg(1, "num_groups"),
                                channel_params(op, [op.arg(2, "weight"), op.arg(3, "bias")]))


def group_norm_links(op: Op, x: Any, groups: Any, params: Iterable[AxisRef | None]
                     ) -> Iterator[Link]:
    """A group norm of `x` [N, C, ...]: statistics per sample and group of C/groups channels
    (over them and the spatial axes), then a per-channel affine (`params`). The channel axis
    is groups × units of one group (a valid transform moves whole groups, and the units
    inside them); one group is the whole axis, a group per channel an instance norm."""
    c = op.shape(x)[1] if ndim(op, x) > 1 else 1
    if not isinstance(groups, int) or groups < 1 or c % groups:
        yield from _frozen_norm(op)
        return
    yield from channel_norm_links(op, x, params, range(2, ndim(op, x)))
    channels = op.x(x, 1)
    if channels is None or groups == c:
        return
    yield Keep(channels, reduced=True)  # the statistics read every unit of a group
    if groups > 1:
        yield from group_links(op, channels, FactorAxis(op.node.name, "groups", groups),
                               "units", c // groups)


@register(nn.LocalResponseNorm, F.local_response_norm)
def _frozen_norm(op: Op) -> Iterator[Link]:
    """Channels normalised over a sliding window: no transform of them is valid."""
    for t in [*op.tensor_args(), op.node]:
        for d in range(ndim(op, t)):
            a = op.x(t, d)
            if a is not None:
                yield Freeze(a, f"`{op.name}` normalises channels in windows (or in groups "
                                f"it cannot tell); they keep their order")

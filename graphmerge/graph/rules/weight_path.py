"""Roles of a parameter that reaches a layer through a weight transform.

A conv or linear weight may be transformed before use: standardised per output unit
(`(w - w.mean(dims)) / w.std(dims)`, `torch.var_mean`, `F.batch_norm` over `w.reshape(1, out,
-1)`), scaled by a gain, cast. The result is still that layer's weight: its axis 0 writes the
layer's output space and its axis 1 reads the input space. `weight_roles` follows a `get_attr`
parameter forward along such a path to the layer and returns the roles the layer gives its axes,
so the parameter rewrite treats them as it treats a weight passed directly. Every op on the path
keeps the row-major layout of the weight (elementwise ops of the weight's shape, reshapes, norms
of the whole weight), so an axis is told by its span (stride, stride · size) in that layout.
Statistics read off the weight (mean, std, var) are side branches that join the path again.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from graphmerge.graph.axes import Role
from graphmerge.graph.kinds import target_name

__all__ = ["weight_roles"]

_ELEMENTWISE = frozenset({
    "add", "sub", "rsub", "mul", "div", "truediv", "neg", "iadd", "isub", "imul", "itruediv",
    "add_", "sub_", "mul_", "div_", "__add__", "__sub__", "__mul__", "__truediv__", "to",
    "_to_copy", "type_as", "contiguous", "clone", "detach", "alias", "float", "double", "half",
    "bfloat16",
})
_NORMS = frozenset({"batch_norm", "instance_norm", "layer_norm", "group_norm"})
_RESHAPES = frozenset({"reshape", "view", "view_as", "reshape_as", "_unsafe_view", "flatten",
                       "unflatten", "squeeze", "unsqueeze"})
_STATISTICS = frozenset({"mean", "std", "var", "var_mean", "std_mean", "sum", "amax", "amin",
                         "norm", "linalg_vector_norm", "size", "dim", "numel", "sym_size",
                         "getattr", "_assert_tensor_metadata"})
# layer -> whether it is transposed (weight [in, out, ...] instead of [out, in, ...])
_LAYERS = {"linear": False, "conv1d": False, "conv2d": False, "conv3d": False,
           "conv_transpose1d": True, "conv_transpose2d": True, "conv_transpose3d": True,
           "convolution": None}

Span = tuple[int, int]


def _spans(shape: tuple[int, ...]) -> dict[int, Span]:
    """Axis -> (stride, stride · size) in the row-major layout, for axes of size > 1."""
    spans, stride = {}, 1
    for d in reversed(range(len(shape))):
        if shape[d] > 1:
            spans[d] = (stride, stride * shape[d])
        stride *= shape[d]
    return spans


def _layer_roles(user: fx.Node, name: str, shape: tuple[int, ...]) -> dict[Span, Role]:
    """Span of each weight axis of `user` (a layer reading the weight) -> its role there."""
    transposed = _LAYERS[name]
    if transposed is None:  # aten.convolution(x, w, b, stride, padding, dilation, transposed, ...)
        transposed = bool(user.args[6]) if len(user.args) > 6 else False
    roles: dict[Span, Role] = {}
    for d, span in _spans(shape).items():
        if d < 2:
            roles[span] = "in" if (d == 1) != transposed else "out"
    return roles


def _continues(user: fx.Node, n: fx.Node, name: str, shapes: dict[str, Any]) -> bool:
    """Whether `user` carries `n`'s values on, in `n`'s row-major layout."""
    first = user.args[0] if user.args else None
    if name in _RESHAPES or name in _NORMS:
        return first is n
    return name in _ELEMENTWISE and shapes.get(user.name) == shapes.get(n.name)


def weight_roles(node: fx.Node, shapes: dict[str, Any]) -> dict[int, Role]:
    """Axis -> role of the `get_attr` parameter `node`, as the layers it reaches through a
    weight transform read it; {} if it reaches anything else (its roles are then declared by
    the rules of the ops that use it, or default to `out`)."""
    spans = _spans(shapes.get(node.name) or ())
    found: dict[int, set[Role]] = {}
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op not in ("call_function", "call_method"):
                return {}
            name = target_name(user)
            weight = user.args[1] if len(user.args) > 1 else user.kwargs.get("weight")
            if name in _LAYERS and weight is n:
                layer = _layer_roles(user, name, shapes.get(n.name) or ())
                for d, (lo, hi) in spans.items():
                    for (a, b), role in layer.items():
                        if a <= lo and hi <= b:
                            found.setdefault(d, set()).add(role)
            elif _continues(user, n, name, shapes):
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
            elif name not in _STATISTICS and not (name in _RESHAPES and user.args[0] is not n):
                return {}  # read by something else: the rules of its users decide
    return {d: roles.pop() for d, roles in found.items() if len(roles) == 1}

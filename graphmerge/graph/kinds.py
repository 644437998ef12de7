"""What an op *is*, read from the graph in one vocabulary for every front end: a module call
(`nn.ReLU`), a function (`F.relu`, `torch.relu`), a method (`x.relu()`) and an aten op
(`aten.relu.default`) are all kind "relu".

Depth surgery needs three facts per op, all here: its kind (`kind`), which of its inputs are
its weight, bias and running statistics (`tensor_args`), and the interval its output lies in
(`value_range`: ReLU ≥ 0, sigmoid in [0, 1], …, carried through pooling and reshapes) — from
which an activation is proven to be the identity on its input (`identity_on`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["kind", "tensor_args", "value_range", "identity_on", "node_key"]

_MODULES: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"), (nn.modules.conv._ConvNd, "conv"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"), (nn.LayerNorm, "layer_norm"),
    (nn.RMSNorm, "rms_norm"), (nn.ReLU, "relu"), (nn.ReLU6, "hardtanh"),
    (nn.Hardtanh, "hardtanh"), (nn.LeakyReLU, "leaky_relu"), (nn.Sigmoid, "sigmoid"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.Softmax, "softmax"), (nn.GELU, "gelu"),
    (nn.SiLU, "silu"), (nn.Tanh, "tanh"), (nn.Dropout, "dropout"), (nn.Identity, "identity"),
    (nn.MaxPool1d, "max_pool"), (nn.MaxPool2d, "max_pool"), (nn.MaxPool3d, "max_pool"),
    (nn.AvgPool1d, "avg_pool"), (nn.AvgPool2d, "avg_pool"), (nn.AvgPool3d, "avg_pool"),
    (nn.AdaptiveAvgPool1d, "avg_pool"), (nn.AdaptiveAvgPool2d, "avg_pool"),
    (nn.AdaptiveAvgPool3d, "avg_pool"), (nn.AdaptiveMaxPool2d, "max_pool"),
    (nn.Flatten, "flatten"), (nn.MultiheadAttention, "multihead_attention"),
)

# function, method and aten names (an in-place "_" suffix dropped) -> kind
_NAMES = {
    "linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
    "convolution": "conv", "batch_norm": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm", "layer_norm": "layer_norm",
    "rms_norm": "rms_norm", "relu": "relu", "relu6": "hardtanh", "hardtanh": "hardtanh",
    "leaky_relu": "leaky_relu", "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid",
    "softmax": "softmax", "_softmax": "softmax", "gelu": "gelu", "silu": "silu", "tanh": "tanh",
    "dropout": "dropout", "feature_dropout": "dropout", "clone": "identity",
    "contiguous": "identity", "alias": "identity", "to": "identity", "float": "identity",
    "max_pool1d": "max_pool",
    "max_pool2d": "max_pool", "max_pool3d": "max_pool", "avg_pool1d": "avg_pool",
    "avg_pool2d": "avg_pool", "avg_pool3d": "avg_pool", "adaptive_avg_pool1d": "avg_pool",
    "adaptive_avg_pool2d": "avg_pool", "adaptive_avg_pool3d": "avg_pool",
    "adaptive_max_pool2d": "max_pool", "mean": "avg_pool", "flatten": "flatten",
    "view": "reshape", "reshape": "reshape", "_unsafe_view": "reshape", "permute": "reshape",
    "transpose": "reshape", "getitem": "getitem", "add": "add", "iadd": "add", "mul": "mul",
    "imul": "mul", "scaled_dot_product_attention": "attention",
}

# argument positions of weight, bias and running statistics, by kind and target name
_ARGS = {
    "linear": {"weight": 1, "bias": 2},
    "conv": {"weight": 1, "bias": 2},
    "layer_norm": {"weight": 2, "bias": 3},
    "rms_norm": {"weight": 2},
    "batch_norm": {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4},
}
_F_BATCH_NORM = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}

# activations and the interval on which each is the identity
_IDENTITY_ON = {"relu": (0.0, math.inf), "leaky_relu": (0.0, math.inf)}
# ops whose output lies in the interval their input lies in (values are only moved or averaged)
_KEEPS_RANGE = {"dropout", "identity", "max_pool", "avg_pool", "flatten", "reshape", "getitem"}


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def kind(n: fx.Node) -> str:
    """The op's kind ("linear", "conv", "batch_norm", "relu", "add", …); for anything else its
    function, method or module class name."""
    if n.op == "call_module":
        module = n.graph.owning_module.get_submodule(n.target)
        return next((k for cls, k in _MODULES if isinstance(module, cls)), type(module).__name__)
    if n.op not in ("call_function", "call_method"):
        return n.op
    name = _target_name(n)
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return _NAMES.get(name, _NAMES.get(base, name))


def node_key(n: fx.Node) -> tuple[str, str]:
    """What must agree between two graphs for a node to correspond: the op and its kind."""
    return n.op, kind(n)


def tensor_args(n: fx.Node) -> dict[str, str]:
    """Qualified names of the op's weight, bias and running statistics ("weight" -> name)."""
    if n.op == "call_module":
        module = n.graph.owning_module.get_submodule(n.target)
        return {role: f"{n.target}.{role}" for role in ("weight", "bias", "running_mean",
                                                         "running_var")
                if isinstance(getattr(module, role, None), torch.Tensor)}
    positions = _ARGS.get(kind(n), {})
    if kind(n) == "batch_norm" and _target_name(n) == "batch_norm" and not isinstance(
            n.target, torch._ops.OpOverload):
        positions = _F_BATCH_NORM  # F.batch_norm(x, running_mean, running_var, weight, bias)
    out = {}
    for role, i in positions.items():
        a = n.args[i] if i < len(n.args) else n.kwargs.get(role)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            out[role] = a.target
    return out


def _hardtanh_bounds(n: fx.Node) -> tuple[float, float]:
    if n.op == "call_module":
        m = n.graph.owning_module.get_submodule(n.target)
        return float(m.min_val), float(m.max_val)
    if _target_name(n).startswith("relu6"):
        return 0.0, 6.0
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


def value_range(n: Any) -> tuple[float, float] | None:
    """An interval every value of node `n` is proven to lie in, or None: from the activation
    that made it, through ops that only move or average values."""
    while isinstance(n, fx.Node):
        k = kind(n)
        if k == "relu":
            return 0.0, math.inf
        if k == "hardtanh":
            return _hardtanh_bounds(n)
        if k in ("sigmoid", "hardsigmoid", "softmax"):
            return 0.0, 1.0
        if k not in _KEEPS_RANGE or not n.args:
            return None
        n = n.args[0]
    return None


def identity_on(n: fx.Node) -> tuple[float, float] | None:
    """The interval on which activation `n` is the identity (None: nowhere, or not known)."""
    k = kind(n)
    if k == "hardtanh":
        return _hardtanh_bounds(n)
    return _IDENTITY_ON.get(k)

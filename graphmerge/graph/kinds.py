"""What an op *is*, read from the graph in one vocabulary for every front end: a module call
(`nn.ReLU`), a function (`F.relu`, `torch.relu`), a method (`x.relu()`) and an aten op
(`aten.relu.default`) are all kind "relu".

This module is the only place that says what an op is. `KINDS` holds one `OpKind` per kind:
its family (activation, norm, linear, …), the module classes and function / method / aten
names that are it, where its weight, bias, running statistics and epsilon are among a call's
arguments, the interval its output is proven to lie in, the interval on which it is the
identity, and whether it keeps a zero or a range of values. Everything else asks here:

- `kind`, `op_kind`, `family` and the predicates `is_activation`, `is_norm`, `is_pass`,
  `keeps_zero`, `has_statistics`;
- `tensor_args` (weight, bias, running statistics by qualified name), `arg_position` and
  `norm_eps` (one epsilon reader for module, functional and aten norms);
- `value_range` (ReLU ≥ 0, sigmoid in [0, 1], …, carried through pooling and reshapes) and
  `identity_on`, from which an activation is proven to be the identity on its input;
- `target_name`, the readable name of a function, method or aten target.

A new op is taught to every caller (stages, REPAIR, depth expansion) by `register_kind`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["OpKind", "KINDS", "FAMILIES", "TENSOR_ROLES", "register_kind", "op_kind", "kind",
           "family", "is_activation", "is_norm", "is_pass", "keeps_zero", "has_statistics",
           "node_key", "target_name", "arg_position", "tensor_args", "norm_eps", "value_range",
           "identity_on"]

Interval = tuple[float, float]
# a fixed interval, or one read from the node (hardtanh's bounds are its arguments)
IntervalRule = Interval | Callable[[fx.Node], Interval] | None

FAMILIES = ("linear", "norm", "activation", "pass", "pool", "reshape", "arith", "attention",
            "cast")
# roles of tensors among an op's arguments (`tensor_args`); "eps" and "normalized_shape" are
# the other roles an `OpKind.args` may place
TENSOR_ROLES = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class OpKind:
    """One kind of op and every fact about it that graph surgery reads.

    `args` places the roles (weight, bias, running_mean, running_var, eps, normalized_shape) of
    the aten form, which the F.* function form shares unless `forms` says otherwise: `forms`
    maps an aten op's name, or "F.<name>" for a `torch.nn.functional` function, to its own
    placement; other calls (`torch.batch_norm`, a method) take the aten order. A role's keyword
    is its name. A module's tensors and epsilon are
    its attributes.
    """

    name: str
    family: str
    modules: tuple[type, ...] = ()      # module classes (and their subclasses) of this kind
    names: tuple[str, ...] = ()         # function, method and aten names (no in-place "_")
    args: Mapping[str, int] = field(default_factory=dict)
    forms: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    eps: float | None = None            # the epsilon when a call gives none (norms)
    bounds: IntervalRule = None         # an interval its output is proven to lie in
    identity: IntervalRule = None       # the interval on which it is the identity
    # acts on each value alone. Softmax does not (it normalises along an axis): it is no
    # activation of a unit of depth (stages, identity units), while REPAIR, which only needs
    # a nonlinearity after a layer, folds before it like before any activation.
    pointwise: bool = True
    keeps_zero: bool = False            # maps a zero tensor to a zero tensor (stages' branches)
    keeps_range: bool = False           # only moves or averages values: output range = input's

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"OpKind {self.name!r}: family {self.family!r} is not one of "
                             f"{FAMILIES}")


def _hardtanh_bounds(n: fx.Node) -> Interval:
    if n.op == "call_module":
        m = n.graph.owning_module.get_submodule(n.target)
        return float(m.min_val), float(m.max_val)
    if target_name(n).startswith("relu6"):
        return 0.0, 6.0
    lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
    hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
    return float(lo), float(hi)


_POSITIVE = (0.0, math.inf)
_UNIT = (0.0, 1.0)
_BATCH_NORM_ATEN = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4, "eps": 7}

# Differences between callers are properties here, not separate sets: softmax is an activation
# but not pointwise (REPAIR folds before it, stages and identity units do not take it);
# pools keep a range but not a zero (as stages have always read branches); only batch norm
# has running statistics (REPAIR corrects those in place and folds before the other norms).
_BUILTIN = (
    OpKind("linear", "linear", (nn.Linear,), ("linear",), {"weight": 1, "bias": 2}),
    OpKind("conv", "linear", (nn.modules.conv._ConvNd,),
           ("conv1d", "conv2d", "conv3d", "convolution"), {"weight": 1, "bias": 2}),
    OpKind("batch_norm", "norm", (nn.modules.batchnorm._BatchNorm,),
           ("batch_norm", "_native_batch_norm_legit_no_training"), _BATCH_NORM_ATEN,
           # F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
           {"F.batch_norm": {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4,
                             "eps": 7},
            "_native_batch_norm_legit_no_training": {**_BATCH_NORM_ATEN, "eps": 6}},
           eps=1e-5),
    OpKind("layer_norm", "norm", (nn.LayerNorm,), ("layer_norm",),
           {"normalized_shape": 1, "weight": 2, "bias": 3, "eps": 4}, eps=1e-5),
    # eps None: the dtype's machine epsilon (torch's default for RMSNorm)
    OpKind("rms_norm", "norm", (nn.RMSNorm,), ("rms_norm",),
           {"normalized_shape": 1, "weight": 2, "eps": 3}),
    OpKind("relu", "activation", (nn.ReLU,), ("relu",), bounds=_POSITIVE, identity=_POSITIVE,
           keeps_zero=True),
    OpKind("hardtanh", "activation", (nn.ReLU6, nn.Hardtanh), ("relu6", "hardtanh"),
           bounds=_hardtanh_bounds, identity=_hardtanh_bounds),
    OpKind("leaky_relu", "activation", (nn.LeakyReLU,), ("leaky_relu",), identity=_POSITIVE,
           keeps_zero=True),
    OpKind("sigmoid", "activation", (nn.Sigmoid,), ("sigmoid",), bounds=_UNIT),
    OpKind("hardsigmoid", "activation", (nn.Hardsigmoid,), ("hardsigmoid",), bounds=_UNIT),
    OpKind("softmax", "activation", (nn.Softmax,), ("softmax", "_softmax"), bounds=_UNIT,
           pointwise=False),
    OpKind("gelu", "activation", (nn.GELU,), ("gelu",), keeps_zero=True),
    OpKind("silu", "activation", (nn.SiLU,), ("silu",), keeps_zero=True),
    OpKind("tanh", "activation", (nn.Tanh,), ("tanh",), keeps_zero=True),
    OpKind("dropout", "pass", (nn.Dropout,), ("dropout", "feature_dropout"), keeps_zero=True,
           keeps_range=True),
    OpKind("identity", "pass", (nn.Identity,), ("clone", "contiguous", "alias", "to", "float"),
           keeps_zero=True, keeps_range=True),
    OpKind("max_pool", "pool", (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                                nn.AdaptiveMaxPool2d),
           ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d"), keeps_range=True),
    OpKind("avg_pool", "pool", (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           ("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
            "adaptive_avg_pool2d", "adaptive_avg_pool3d", "mean"), keeps_range=True),
    OpKind("flatten", "reshape", (nn.Flatten,), ("flatten",), keeps_zero=True,
           keeps_range=True),
    OpKind("reshape", "reshape", (), ("view", "reshape", "_unsafe_view", "permute",
                                      "transpose", "reshape_as", "view_as"), keeps_zero=True,
           keeps_range=True),
    OpKind("getitem", "reshape", (), ("getitem",), keeps_zero=True, keeps_range=True),
    # only move values (a shifted window's roll, cutting padding off): a zero stays a zero
    OpKind("roll", "reshape", (), ("roll",), keeps_zero=True, keeps_range=True),
    OpKind("slice", "reshape", (), ("slice",), keeps_zero=True, keeps_range=True),
    # joins its inputs along an axis (one kind for every spelling): zero only when all are
    OpKind("cat", "reshape", (), ("cat", "concat", "concatenate")),
    OpKind("add", "arith", (), ("add", "iadd")),
    OpKind("mul", "arith", (), ("mul", "imul"), keeps_zero=True),  # zero when a factor is
    # a cast to another tensor's dtype keeps a zero; it is no "identity" (its own kind)
    OpKind("type_as", "cast", (), ("type_as",), keeps_zero=True),
    OpKind("attention", "attention", (), ("scaled_dot_product_attention",)),
    OpKind("multihead_attention", "attention", (nn.MultiheadAttention,)),
)

_KINDS: dict[str, OpKind] = {}
_BY_MODULE: dict[type, str] = {}   # module class -> kind (subclasses: through their MRO)
_BY_NAME: dict[str, str] = {}      # function, method and aten name -> kind
KINDS: Mapping[str, OpKind] = MappingProxyType(_KINDS)  # read-only view, by kind name


def register_kind(op: OpKind) -> Callable[[], None]:
    """Add (or replace) a kind, its module classes and its names; every caller then treats
    the op by `op`'s properties. Returns a function that undoes the registration."""
    undo = [(_KINDS, op.name, _KINDS.get(op.name))]
    undo += [(_BY_MODULE, cls, _BY_MODULE.get(cls)) for cls in op.modules]
    undo += [(_BY_NAME, name, _BY_NAME.get(name)) for name in op.names]
    _KINDS[op.name] = op
    _BY_MODULE.update(dict.fromkeys(op.modules, op.name))
    _BY_NAME.update(dict.fromkeys(op.names, op.name))

    def unregister() -> None:
        for table, key, old in reversed(undo):
            if old is None:
                table.pop(key, None)
            else:
                table[key] = old
    return unregister


for _builtin in _BUILTIN:
    register_kind(_builtin)


def target_name(n: fx.Node) -> str:
    """The readable name of a node's target: an aten op's name without its overload
    (aten.view.default -> "view"), a function's or method's name, a module's path ("" for a
    callable with no name). The one reading of a target that every module shares."""
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return t._overloadpacket.__name__
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def kind(n: fx.Node) -> str:
    """The op's kind ("linear", "conv", "batch_norm", "relu", "add", …); for anything else its
    function, method or module class name."""
    if n.op == "call_module":
        cls = type(n.graph.owning_module.get_submodule(n.target))
        return next((_BY_MODULE[c] for c in cls.__mro__ if c in _BY_MODULE), cls.__name__)
    if n.op not in ("call_function", "call_method"):
        return n.op
    name = target_name(n)
    base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
    return _BY_NAME.get(name, _BY_NAME.get(base, name))


def op_kind(x: fx.Node | str) -> OpKind | None:
    """The `OpKind` of a node or a kind name (None: a kind this module does not describe)."""
    return _KINDS.get(kind(x) if isinstance(x, fx.Node) else x)


def family(x: fx.Node | str) -> str | None:
    """The family of a node's or kind's op ("activation", "norm", …; None: not described)."""
    op = op_kind(x)
    return op.family if op else None


def is_activation(x: fx.Node | str, pointwise: bool = False) -> bool:
    """Whether the op is an activation; with `pointwise`, one that acts on each value alone
    (not softmax): the only kind that ends a unit of depth."""
    op = op_kind(x)
    return op is not None and op.family == "activation" and (op.pointwise or not pointwise)


def is_norm(x: fx.Node | str) -> bool:
    """Whether the op is a normalisation (batch, layer or RMS norm)."""
    return family(x) == "norm"


def is_pass(x: fx.Node | str) -> bool:
    """Whether the op passes its input on unchanged in eval mode (dropout, nn.Identity, clone,
    `.to`, `.float()`)."""
    return family(x) == "pass"


def keeps_zero(x: fx.Node | str) -> bool:
    """Whether the op maps a zero tensor to a zero tensor (a product: when a factor is)."""
    op = op_kind(x)
    return op is not None and op.keeps_zero


def has_statistics(x: fx.Node | str) -> bool:
    """Whether the op is a norm with running statistics (a batch norm)."""
    op = op_kind(x)
    return op is not None and op.family == "norm" and "running_mean" in op.args


def node_key(n: fx.Node) -> tuple[str, str]:
    """What must agree between two graphs for a node to correspond: the op and its kind."""
    return n.op, kind(n)


def _placement(n: fx.Node, op: OpKind) -> Mapping[str, int]:
    """Where `op`'s roles are among the arguments of call `n` (see `OpKind`)."""
    name = target_name(n)
    functional = getattr(n.target, "__module__", None) == "torch.nn.functional"
    return op.forms.get(f"F.{name}" if functional else name, op.args)


def arg_position(n: fx.Node, role: str) -> int | None:
    """The position of argument `role` ("weight", "eps", "normalized_shape", …) of function,
    method or aten call `n` (None: its kind has no such argument)."""
    op = op_kind(n)
    if op is None or n.op not in ("call_function", "call_method"):
        return None
    return _placement(n, op).get(role)


def _arg(n: fx.Node, role: str) -> Any:
    """Argument `role` of call `n`: by position, else by keyword; None when not given."""
    i = arg_position(n, role)
    if i is None:
        return None
    return n.args[i] if i < len(n.args) else n.kwargs.get(role)


def tensor_args(n: fx.Node) -> dict[str, str]:
    """Qualified names of the op's weight, bias and running statistics ("weight" -> name)."""
    if n.op == "call_module":
        module = n.graph.owning_module.get_submodule(n.target)
        return {role: f"{n.target}.{role}" for role in TENSOR_ROLES
                if isinstance(getattr(module, role, None), torch.Tensor)}
    out = {}
    for role in TENSOR_ROLES:
        a = _arg(n, role)
        if isinstance(a, fx.Node) and a.op == "get_attr":
            out[role] = a.target
    return out


def norm_eps(n: fx.Node, root: nn.Module | None = None) -> float:
    """The epsilon of norm `n`, a module (`nn.BatchNorm2d(eps=…)`, read from `root`, default
    the graph's module), function (`F.layer_norm(…, eps)`) or aten call alike: its attribute,
    else its argument by position or keyword, else its kind's default; no epsilon (RMSNorm's
    default) is the default dtype's machine epsilon.

    Raises:
        ValueError: `n` is not a norm.
    """
    op = op_kind(n)
    if op is None or op.family != "norm":
        raise ValueError(f"node `{n.name}` ({kind(n)}) is not a norm; it has no epsilon")
    if n.op == "call_module":
        root = n.graph.owning_module if root is None else root
        eps = getattr(root.get_submodule(n.target), "eps", op.eps)
    else:
        eps = _arg(n, "eps")
        eps = op.eps if eps is None else eps
    return torch.finfo(torch.get_default_dtype()).eps if eps is None else float(eps)


def _interval(rule: IntervalRule, n: fx.Node) -> Interval | None:
    return rule(n) if callable(rule) else rule


def value_range(n: Any) -> Interval | None:
    """An interval every value of node `n` is proven to lie in, or None: from the activation
    that made it, through ops that only move or average values."""
    while isinstance(n, fx.Node):
        op = op_kind(n)
        if op is not None and op.bounds is not None:
            return _interval(op.bounds, n)
        if op is None or not op.keeps_range or not n.args:
            return None
        n = n.args[0]
    return None


def identity_on(n: fx.Node) -> Interval | None:
    """The interval on which activation `n` is the identity (None: nowhere, or not known)."""
    op = op_kind(n)
    return _interval(op.identity, n) if op is not None else None

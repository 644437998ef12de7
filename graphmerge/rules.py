"""Per-op axis rules: which axes of an op's inputs, outputs and parameters share one transform.

A rule receives an `Op` (the fx node, its module if any, concrete shapes) and yields links:

- `Same(a, b, ...)`: these axes share one transform (a node axis `op.x(...)` or a parameter axis
  `op.p(...)` that carries its role, `in` = the parameter reads the space, `out` = it writes it);
- `Cat(whole, parts)` / `Kron(whole, parts)`: the whole axis is derived from its parts, by
  concatenation (cat, split, slicing) or by a row-major product (flatten C×H×W → C·H·W, D → heads×dim);
- `Freeze(axis, why)`: the op is not equivariant along this axis; its space keeps the identity;
- `Keep(axis)`: the op's result does not change under any permutation of this axis (a sum over
  it, a shape query), or the axis is linked elsewhere; nothing is linked here.

Every node axis of size > 1 that a rule does not mention is frozen, so a forgotten axis can never
produce a silently wrong merge. Ops without a rule freeze every axis they touch, with one warning.
Rules live in one registry keyed by module class, function object or method name; registering a key
twice is an error.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NodeAxis",
    "ParamAxis",
    "Same",
    "Cat",
    "Kron",
    "Freeze",
    "Keep",
    "Op",
    "register",
    "rule_for",
    "RULES",
]

Role = Literal["in", "out", "auto"]


@dataclass(frozen=True)
class NodeAxis:
    """Axis `dim` (non-negative) of the value of node `node` (`node#i` for the i-th of a tuple)."""

    node: str
    dim: int

    def __str__(self) -> str:
        return f"{self.node}[{self.dim}]"


@dataclass(frozen=True)
class ParamAxis:
    """Axis `dim` of parameter or buffer `param` (qualified name), with its role.

    `in`: the parameter reads the space (weight columns); `out`: it writes values in the space
    (weight rows, bias, norm affine, running statistics); `auto`: a `get_attr` read whose role is
    `in` if some op contracts over it and `out` otherwise.
    """

    param: str
    dim: int
    role: Role = "out"

    def __str__(self) -> str:
        return f"{self.param}[{self.dim}]:{self.role}"


AxisRef = Union[NodeAxis, ParamAxis]


@dataclass(frozen=True)
class Same:
    axes: tuple[AxisRef, ...]

    def __init__(self, *axes: AxisRef | None) -> None:
        object.__setattr__(self, "axes", tuple(a for a in axes if a is not None))


@dataclass(frozen=True)
class Cat:
    """whole = concatenation of parts; a part is an axis or an int (a width with no axis)."""

    whole: NodeAxis
    parts: tuple[NodeAxis | int, ...]


@dataclass(frozen=True)
class Kron:
    """whole (size Π sizes) = row-major product of parts: index i·|b| + j ↔ (a_i, b_j)."""

    whole: NodeAxis
    parts: tuple[NodeAxis | int, ...]


@dataclass(frozen=True)
class Freeze:
    axis: NodeAxis
    why: str


@dataclass(frozen=True)
class Keep:
    axis: NodeAxis


Link = Union[Same, Cat, Kron, Freeze, Keep]


_SELF = object()


class Op:
    """What a rule sees of one fx node: the node, its module, and concrete shapes."""

    def __init__(self, node: fx.Node, module: nn.Module | None, shapes: dict[str, Any],
                 consts: dict[str, Any] | None = None) -> None:
        self.node = node
        self.module = module
        self._shapes = shapes
        self._consts = consts or {}

    def value(self, a: Any) -> Any:
        """`a` with nodes that hold non-tensor values (sizes, ints) replaced by those values."""
        if isinstance(a, fx.Node):
            return self._consts.get(a.name, a)
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        if isinstance(a, (tuple, list)):
            return type(a)(self.value(v) for v in a)
        return a

    # ---- values and shapes -------------------------------------------------------------
    def arg(self, i: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument `i`, or keyword `name`, else `default` (constants resolved)."""
        if i < len(self.node.args):
            return self.value(self.node.args[i])
        if name is not None and name in self.node.kwargs:
            return self.value(self.node.kwargs[name])
        return default

    def shape(self, x: Any = _SELF) -> tuple[int, ...] | None:
        """Concrete shape of node `x` (the op's own output if omitted); None if not a tensor."""
        x = self.node if x is _SELF else x
        if isinstance(x, fx.Node):
            s = self._shapes.get(x.name)
            if isinstance(s, tuple) and all(isinstance(d, int) for d in s):
                return s
        return None

    def is_tensor(self, x: Any) -> bool:
        return self.shape(x) is not None

    def tensor_args(self) -> list[fx.Node]:
        """Every tensor-valued node among the arguments (nested in lists/tuples too)."""
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n) or n)
        return [n for n in found if self.is_tensor(n)]

    # ---- axis references ----------------------------------------------------------------
    def x(self, node: Any, dim: int) -> NodeAxis | None:
        """Axis `dim` (negative allowed) of tensor node `node`; None if it has size 1 or is absent."""
        s = self.shape(node)
        if s is None:
            return None
        if dim < 0:
            dim += len(s)
        if not 0 <= dim < len(s) or s[dim] == 1:
            return None
        return NodeAxis(node.name, dim)

    def out(self, dim: int) -> NodeAxis | None:
        return self.x(self.node, dim)

    def p(self, name: str, dim: int, role: Role) -> ParamAxis | None:
        """Axis `dim` of this module's parameter/buffer `name` (None if absent or size 1)."""
        t = getattr(self.module, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] == 1:
            return None
        return ParamAxis(f"{self.node.target}.{name}", dim, role)

    @property
    def name(self) -> str:
        """A readable name of the op: module class, function or method name."""
        if self.module is not None:
            return type(self.module).__name__
        t = self.node.target
        return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


RuleFn = Callable[[Op], Iterable[Link]]
RULES: dict[Any, RuleFn] = {}


def register(*keys: Any) -> Callable[[RuleFn], RuleFn]:
    """Register a rule for module classes, function objects or method names (strings)."""

    def deco(fn: RuleFn) -> RuleFn:
        for key in keys:
            if key in RULES:
                raise RuntimeError(f"an axis rule for {key!r} is already registered")
            RULES[key] = fn
        return fn

    return deco


def rule_for(node: fx.Node, module: nn.Module | None) -> RuleFn | None:
    """The rule for a node: by exact module class, by function object, or by method name."""
    if node.op == "call_module":
        cls = type(module)
        if cls in RULES:
            return RULES[cls]
        # a subclass that keeps its parent's forward behaves like the parent
        for base in cls.__mro__[1:]:
            if base in RULES and cls.forward is base.forward:
                return RULES[base]
        return None
    if node.op == "call_method":
        return RULES.get(node.target)
    if node.op == "call_function":
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


# ---- helpers that keep the rules short ----------------------------------------------------


def _ndim(op: Op, x: Any) -> int:
    s = op.shape(x)
    return 0 if s is None else len(s)


def _broadcast(op: Op, operands: Sequence[Any]) -> Iterator[Link]:
    """Elementwise op with numpy broadcasting: every non-broadcast axis of each operand ~ output."""
    n = _ndim(op, op.node)
    for d in range(n):
        axes = [op.out(d)]
        for t in operands:
            k = _ndim(op, t)
            if k and d - (n - k) >= 0:
                axes.append(op.x(t, d - (n - k)))
        yield Same(*axes)


def _pass_through(op: Op, src: Any) -> Iterator[Link]:
    """Output has the shape of `src` and is computed position by position."""
    for d in range(_ndim(op, src)):
        yield Same(op.x(src, d), op.out(d))


def _keep_all(op: Op, x: Any) -> Iterator[Link]:
    for d in range(_ndim(op, x)):
        a = op.x(x, d)
        if a is not None:
            yield Keep(a)


def _dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)


# ---- elementwise --------------------------------------------------------------------------

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity, nn.Softmax, nn.LogSoftmax,
)
_UNARY_FUNCTIONS = (
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d,
    F.softmax, F.log_softmax, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log,
    torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.erf, torch.sin, torch.cos,
    torch.square, torch.reciprocal, torch.clamp, torch.softmax, torch.log_softmax,
    torch.sigmoid, torch.nn.functional.sigmoid, torch.nn.functional.tanh, operator.neg,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.pow,
)
_UNARY_METHODS = (
    "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "erf", "square",
    "reciprocal", "clamp", "clamp_min", "clamp_max", "pow", "softmax", "log_softmax",
    "contiguous", "clone", "detach", "float", "double", "half", "bfloat16", "to", "type",
    "type_as", "new_zeros", "new_ones", "new_full", "new_empty", "requires_grad_", "cpu",
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
    if op.node.target in ("type_as", "to", "new_zeros", "new_ones", "new_full", "new_empty"):
        yield from _pass_through(op, src)
        for t in op.tensor_args()[1:]:
            yield from _keep_all(op, t)
        return
    yield from _broadcast(op, op.tensor_args())


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
    yield from _broadcast(op, op.tensor_args())


@register("size", "dim", "numel", "nelement", getattr, "__len__", len)
def _metadata(op: Op) -> Iterator[Link]:
    """Shape/dtype queries: read nothing that a permutation changes."""
    for t in op.tensor_args():
        yield from _keep_all(op, t)


@register(torch.zeros, torch.ones, torch.full, torch.empty)
def _constant(op: Op) -> Iterator[Link]:
    """Constant-filled tensors are unchanged by any permutation of their axes."""
    for d in range(_ndim(op, op.node)):
        a = op.out(d)
        if a is not None:
            yield Keep(a)


# ---- linear maps --------------------------------------------------------------------------


@register(nn.Linear)
def _linear(op: Op) -> Iterator[Link]:
    x = op.node.args[0]
    n = _ndim(op, x)
    for d in range(n - 1):
        yield Same(op.x(x, d), op.out(d))
    yield Same(op.x(x, -1), op.p("weight", 1, "in"))
    yield Same(op.out(-1), op.p("weight", 0, "out"), op.p("bias", 0, "out"))


@register(nn.Bilinear)
def _bilinear(op: Op) -> Iterator[Link]:
    a, b = op.node.args[0], op.node.args[1]
    for d in range(_ndim(op, a) - 1):
        yield Same(op.x(a, d), op.x(b, d), op.out(d))
    yield Same(op.x(a, -1), op.p("weight", 1, "in"))
    yield Same(op.x(b, -1), op.p("weight", 2, "in"))
    yield Same(op.out(-1), op.p("weight", 0, "out"), op.p("bias", 0, "out"))


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
    else:
        why = f"grouped convolution (groups={groups}, {cin}→{cout} channels) has no rule yet"
        for a in (op.x(x, 1), op.out(1)):
            if a is not None:
                yield Freeze(a, why)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
          nn.ConvTranspose3d)
def _conv(op: Op) -> Iterator[Link]:
    """Channels link through weights; spatial axes are left unmentioned, hence frozen."""
    m = op.module
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    yield from _conv_links(op, op.node.args[0], None, None, m.groups, transposed,
                           lambda d, r: op.p("weight", d, r), lambda d, r: op.p("bias", d, r))


def _functional_param(op: Op, t: Any, d: int, role: Role) -> AxisRef | None:
    """Axis of a weight passed to F.linear/F.conv; roles of get_attr weights are declared here."""
    if not isinstance(t, fx.Node):
        return None
    if t.op == "get_attr":
        p = _get_attr_tensor(op, t)
        if p is None or p.dim() <= d or p.shape[d] == 1:
            return None
        return ParamAxis(t.target, d, role)
    return op.x(t, d)


def _get_attr_tensor(op: Op, node: fx.Node) -> torch.Tensor | None:
    root = node.graph.owning_module
    obj: Any = root
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


@register(F.linear)
def _f_linear(op: Op) -> Iterator[Link]:
    x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
    for d in range(_ndim(op, x) - 1):
        yield Same(op.x(x, d), op.out(d))
    yield Same(op.x(x, -1), _functional_param(op, w, 1, "in"), op.x(w, 1))
    yield Same(op.out(-1), _functional_param(op, w, 0, "out"), op.x(w, 0),
               _functional_param(op, b, 0, "out"), op.x(b, 0))


@register(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
          F.conv_transpose3d)
def _f_conv(op: Op) -> Iterator[Link]:
    x, w, b = op.arg(0, "input"), op.arg(1, "weight"), op.arg(2, "bias")
    transposed = "transpose" in op.name
    groups = op.arg(6, "groups", 1)
    for t in (w, b):  # channel axes link through the parameter; kernel positions must not move
        for d in range(_ndim(op, t)):
            a = op.x(t, d)
            if a is not None:
                yield Keep(a) if d < 2 else Freeze(a, "convolution kernel positions")
    yield from _conv_links(op, x, w, b, groups, transposed,
                           lambda d, r: _functional_param(op, w, d, r),
                           lambda d, r: _functional_param(op, b, d, r))


def _matmul_links(op: Op, a: Any, b: Any) -> Iterator[Link]:
    """a [..., n, k] @ b [..., k, m] -> [..., n, m]; batch axes broadcast."""
    na, nb, n = _ndim(op, a), _ndim(op, b), _ndim(op, op.node)
    if na < 2 or nb < 2:
        for t in (a, b):
            for d in range(_ndim(op, t)):
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
        return (_functional_param(op, t, d, role), op.x(t, d))
    return (op.x(t, d),)


@register(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm", "__matmul__")
def _matmul(op: Op) -> Iterator[Link]:
    yield from _matmul_links(op, op.node.args[0], op.node.args[1])


@register(F.scaled_dot_product_attention)
def _sdpa(op: Op) -> Iterator[Link]:
    """q [..., L, E], k [..., S, E], v [..., S, Ev] -> [..., L, Ev]; mask broadcast to [..., L, S]."""
    q, k, v = op.arg(0, "query"), op.arg(1, "key"), op.arg(2, "value")
    n = _ndim(op, q)
    yield Same(op.x(q, -1), op.x(k, -1))
    yield Same(op.x(v, -1), op.out(-1))
    yield Same(op.x(q, -2), op.out(-2))
    yield Same(op.x(k, -2), op.x(v, -2))
    for d in range(n - 2):
        yield Same(op.x(q, d), op.x(k, d), op.x(v, d), op.out(d))
    mask = op.arg(3, "attn_mask")
    if isinstance(mask, fx.Node) and op.is_tensor(mask):
        m = _ndim(op, mask)
        if m >= 1:
            yield Same(op.x(mask, m - 1), op.x(k, -2))
        if m >= 2:
            yield Same(op.x(mask, m - 2), op.x(q, -2))
        for d in range(m - 2):
            yield Same(op.x(mask, d), op.out(d + n - m))


# ---- norms and embeddings -----------------------------------------------------------------


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d)
def _batch_norm(op: Op) -> Iterator[Link]:
    """Channel axis 1 ~ affine parameters and running statistics; other axes pass through."""
    x = op.node.args[0]
    for d in range(_ndim(op, x)):
        if d == 1:
            yield Same(op.x(x, 1), op.out(1), *(op.p(n, 0, "out") for n in
                       ("weight", "bias", "running_mean", "running_var")))
        else:
            yield Same(op.x(x, d), op.out(d))


def _norm_last(op: Op, x: Any, k: int, params: Sequence[Callable[[int], AxisRef | None]]
               ) -> Iterator[Link]:
    """Normalisation over the last `k` axes, with elementwise affine parameters on them."""
    n = _ndim(op, x)
    for d in range(n):
        j = d - (n - k)
        yield Same(op.x(x, d), op.out(d), *((f(j) for f in params) if j >= 0 else ()))


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
            yield from _keep_all(op, t)
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    yield from _norm_last(op, x, k, [
        lambda j: _functional_param(op, w, j, "out") or op.x(w, j),
        lambda j: _functional_param(op, b, j, "out") or op.x(b, j),
    ])


@register(nn.GroupNorm, F.group_norm, nn.LocalResponseNorm)
def _frozen_norm(op: Op) -> Iterator[Link]:
    """Group-structured channels need a block-constrained matcher, which does not exist yet."""
    for t in [*op.tensor_args(), op.node]:
        for d in range(_ndim(op, t)):
            a = op.x(t, d)
            if a is not None:
                yield Freeze(a, f"{op.name} groups channels; no block-constrained matcher yet")


@register(nn.Embedding)
def _embedding(op: Op) -> Iterator[Link]:
    """Output [*idx, D]: index axes pass through, D ~ weight axis 1 (out)."""
    idx = op.node.args[0]
    yield from _pass_through(op, idx)
    yield Same(op.out(-1), op.p("weight", 1, "out"))


@register(F.embedding)
def _f_embedding(op: Op) -> Iterator[Link]:
    idx, w = op.arg(0, "input"), op.arg(1, "weight")
    yield from _pass_through(op, idx)
    yield Same(op.out(-1), _functional_param(op, w, 1, "out"), op.x(w, 1))
    if op.x(w, 0) is not None:
        yield Freeze(op.x(w, 0), "embedding rows are looked up by index")


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


@register(*_POOL_MODULES, *_POOL_FUNCTIONS)
def _pool(op: Op) -> Iterator[Link]:
    """Batch and channel axes pass through; spatial axes are unmentioned, hence frozen."""
    x = op.arg(0, "input")
    yield Same(op.x(x, 0), op.out(0))
    yield Same(op.x(x, 1), op.out(1))


_REDUCTIONS = (torch.sum, torch.mean, torch.amax, torch.amin, torch.std, torch.var,
               torch.logsumexp, torch.norm, torch.prod,
               "sum", "mean", "amax", "amin", "std", "var", "logsumexp", "norm", "prod")


@register(*_REDUCTIONS)
def _reduce(op: Op) -> Iterator[Link]:
    """Reduced axes are read symmetrically (Keep); surviving axes pass through."""
    x = op.node.args[0]
    n = _ndim(op, x)
    dim = op.arg(2 if op.name == "norm" else 1, "dim")
    reduced = _dims(dim, n) if n else []
    if reduced is None:
        reduced = list(range(n))
    keepdim = _ndim(op, op.node) == n  # read off the shapes: robust to every signature
    out_d = 0
    for d in range(n):
        if d in reduced:
            a = op.x(x, d)
            if a is not None:
                yield Keep(a)
            out_d += keepdim
        else:
            yield Same(op.x(x, d), op.out(out_d))
            out_d += 1


# ---- shape ops ------------------------------------------------------------------------------


def _reshape_links(op: Op, src: Any) -> Iterator[Link]:
    """Group the axes of `src` and of the output by equal running products (size-1 axes drop).

    1 ↔ 1 groups link; k → 1 groups make the output axis a Kron of the inputs (flatten);
    1 → k groups make the input axis a Kron of the outputs (heads × head_dim); k ↔ m is frozen.
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
        if len(gi) == 1 and len(gj) == 1:
            yield Same(NodeAxis(src.name, gi[0]), NodeAxis(op.node.name, gj[0]))
        elif len(gj) == 1:
            yield Kron(NodeAxis(op.node.name, gj[0]), tuple(NodeAxis(src.name, d) for d in gi))
        elif len(gi) == 1:
            yield Kron(NodeAxis(src.name, gi[0]), tuple(NodeAxis(op.node.name, d) for d in gj))
        else:
            why = f"reshape {si} -> {so} regroups axes {gi} -> {gj}"
            for d in gi:
                yield Freeze(NodeAxis(src.name, d), why)
            for d in gj:
                yield Freeze(NodeAxis(op.node.name, d), why)


@register(nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
          "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
          "reshape_as")
def _reshape(op: Op) -> Iterator[Link]:
    src = op.node.args[0]
    if op.node.target in ("view_as", "reshape_as"):
        yield from _keep_all(op, op.node.args[1])
    yield from _reshape_links(op, src)


@register(torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
          "permute", "transpose", "swapaxes", "movedim", "t")
def _permute(op: Op) -> Iterator[Link]:
    """Relabel axes: output axis k is input axis order[k]."""
    src = op.node.args[0]
    n = _ndim(op, src)
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
    """Non-cat axes pass through; the cat axis is a concatenation of the inputs' axes."""
    tensors = list(op.arg(0, "tensors"))
    n = _ndim(op, op.node)
    dim = op.arg(1, "dim", 0) % n
    for d in range(n):
        if d != dim:
            yield Same(op.out(d), *(op.x(t, d) for t in tensors))
    yield Cat(NodeAxis(op.node.name, dim),
              tuple(op.x(t, dim) or op.shape(t)[dim] for t in tensors))


@register(torch.stack)
def _stack(op: Op) -> Iterator[Link]:
    """The new axis indexes the inputs (not a channel axis, so frozen); others pass through."""
    tensors = list(op.arg(0, "tensors"))
    n = _ndim(op, op.node)
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
    n = _ndim(op, src)
    name = op.name
    default_dim = 0
    dim = op.arg(2, "dim", default_dim) if name in ("split", "chunk", "tensor_split") else op.arg(
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
        piece = src_shape[idx]
        if piece is not None:
            for d in range(len(piece)):
                if piece[d] != 1:
                    yield Same(NodeAxis(f"{src.name}#{idx}", d), op.out(d))
        return
    yield from _index_links(op, src, idx if isinstance(idx, tuple) else (idx,))


def _index_links(op: Op, src: fx.Node, idx: tuple[Any, ...]) -> Iterator[Link]:
    shape = op.shape(src)
    n = len(shape)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
        return  # advanced indexing: leave everything unmentioned (frozen)
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        expanded.extend([slice(None)] * (n - consumed) if i is Ellipsis else [i])
    if Ellipsis not in idx:
        expanded.extend([slice(None)] * (n - consumed))
    d_in = d_out = 0
    for i in expanded:
        if i is None:
            d_out += 1
            continue
        if isinstance(i, int):
            a = op.x(src, d_in)
            if a is not None:
                yield Freeze(a, f"indexing picks position {i} of axis {d_in}")
            d_in += 1
            continue
        start, stop, step = i.indices(shape[d_in])
        if step != 1:
            d_in += 1
            d_out += 1
            continue  # strided slices: unmentioned, hence frozen
        if (start, stop) == (0, shape[d_in]):
            yield Same(op.x(src, d_in), op.out(d_out))
        else:
            parts = (start, op.out(d_out) or (stop - start), shape[d_in] - stop)
            yield Cat(NodeAxis(src.name, d_in), tuple(p for p in parts if p != 0))
        d_in += 1
        d_out += 1


@register(torch.narrow, "narrow")
def _narrow(op: Op) -> Iterator[Link]:
    """narrow(x, dim, start, length) is the slice x[..., start:start+length, ...]."""
    src = op.node.args[0]
    dim, start, length = op.arg(1, "dim"), op.arg(2, "start"), op.arg(3, "length")
    n = _ndim(op, src)
    idx = [slice(None)] * n
    idx[dim % n] = slice(start, start + length)
    yield from _index_links(op, src, tuple(idx))


@register("expand", "expand_as", "repeat", "broadcast_to", torch.broadcast_to)
def _expand(op: Op) -> Iterator[Link]:
    """Right-aligned axes whose size is unchanged pass through; grown or new axes are frozen."""
    src = op.node.args[0]
    if op.node.target == "expand_as":
        yield from _keep_all(op, op.node.args[1])
    si, so = op.shape(src), op.shape()
    for d in range(len(si)):
        e = d + len(so) - len(si)
        if e >= 0 and si[d] == so[e]:
            yield Same(op.x(src, d), op.out(e))


@register("get_attr")
def _get_attr(op: Op) -> Iterator[Link]:
    """A parameter read in the graph: node axis d ~ parameter axis d (role set by its users)."""
    t = _get_attr_tensor(op, op.node)
    if t is None:
        return
    for d in range(t.dim()):
        if t.shape[d] != 1:
            yield Same(NodeAxis(op.node.name, d), ParamAxis(op.node.target, d, "auto"))


"""The axis-rule registry: what a rule sees of an op (`Op`), `register`, `rule_for`, and the
helpers that keep rules a few lines long."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import GraphmergeError
from graphmerge.graph.axes import AxisRef, Keep, Link, NodeAxis, ParamAxis, Role, Same
from graphmerge.graph.kinds import target_name

__all__ = ["Op", "RuleFn", "RULES", "register", "alias", "rule_for", "is_metadata"]


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
        """Axis `dim` (negative allowed) of tensor node `node`; None if it is absent or has no
        units to move (size 0 or 1)."""
        s = self.shape(node)
        if s is None:
            return None
        if dim < 0:
            dim += len(s)
        if not 0 <= dim < len(s) or s[dim] <= 1:
            return None
        return NodeAxis(node.name, dim)

    def out(self, dim: int) -> NodeAxis | None:
        return self.x(self.node, dim)

    def p(self, name: str, dim: int, role: Role) -> ParamAxis | None:
        """Axis `dim` of this module's parameter/buffer `name` (None if absent or size 1)."""
        t: Any = self.module
        for part in name.split("."):  # "out_proj.weight": a parameter of a child
            t = getattr(t, part, None)
        if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] == 1:
            return None
        return ParamAxis(f"{self.node.target}.{name}", dim, role)

    @property
    def name(self) -> str:
        """A readable name of the op: module class, function or method name.

        Rules tell ops apart by it, so unlike `kinds.target_name` a module call is named by its
        class ("Softmax"), not its path in the model, and a target with no name by its repr.
        """
        if self.module is not None:
            return type(self.module).__name__
        return target_name(self.node) or repr(self.node.target)


RuleFn = Callable[[Op], Iterable[Link]]
RULES: dict[Any, RuleFn] = {}


def alias(key: Any, *same_as: Any) -> None:
    """Register `key` with the rule of `same_as[0]` (an op whose arguments come in the same
    order: `aten.linear.default` and `F.linear`); further keys are fallbacks if the first has
    no rule."""
    for k in same_as:
        if k in RULES:
            register(key)(RULES[k])
            return
    raise GraphmergeError(f"cannot alias {key!r}: none of {same_as} has a rule")


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


_METADATA = {"size", "dim", "numel", "nelement", "__len__", "len", "sym_size", "sym_numel",
             "sym_stride", "_assert_tensor_metadata"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad"}


def is_metadata(node: fx.Node) -> bool:
    """Whether `node` reads only metadata of its input (shape, dtype, device), not values."""
    if node.op not in ("call_function", "call_method"):
        return False
    t = node.target
    if t is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES
    if isinstance(t, torch._ops.OpOverload):
        t = t._overloadpacket.__name__
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    return name in _METADATA


def ndim(op: Op, x: Any) -> int:
    s = op.shape(x)
    return 0 if s is None else len(s)


def broadcast(op: Op, operands: Sequence[Any]) -> Iterator[Link]:
    """Elementwise op with numpy broadcasting: every non-broadcast axis of each operand ~ output."""
    n = ndim(op, op.node)
    for d in range(n):
        axes = [op.out(d)]
        for t in operands:
            k = ndim(op, t)
            if k and d - (n - k) >= 0:
                axes.append(op.x(t, d - (n - k)))
        yield Same(*axes)


def pass_through(op: Op, src: Any) -> Iterator[Link]:
    """Output has the shape of `src` and is computed position by position."""
    for d in range(ndim(op, src)):
        yield Same(op.x(src, d), op.out(d))


def keep_all(op: Op, x: Any) -> Iterator[Link]:
    for d in range(ndim(op, x)):
        a = op.x(x, d)
        if a is not None:
            yield Keep(a)


def dims(dim: Any, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)



def functional_param(op: Op, t: Any, d: int, role: Role) -> AxisRef | None:
    """Axis of a weight passed to F.linear/F.conv; roles of get_attr weights are declared here."""
    if not isinstance(t, fx.Node):
        return None
    if t.op == "get_attr":
        p = get_attr_tensor(op, t)
        if p is None or p.dim() <= d or p.shape[d] == 1:
            return None
        return ParamAxis(t.target, d, role)
    return op.x(t, d)


def get_attr_tensor(op: Op, node: fx.Node) -> torch.Tensor | None:
    root = node.graph.owning_module
    obj: Any = root
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None

"""Typed axis references and the links axis rules return.

An axis is a `NodeAxis` (an axis of the value an fx node computes) or a `ParamAxis` (an axis of
a parameter or buffer, with its role). A rule returns links between them:

- `Same(a, b, ...)`: these axes share one transform;
- `Cat(whole, parts)` / `Kron(whole, parts)`: the whole axis is derived from its parts, by
  concatenation (cat, split, slicing) or by a row-major product (flatten C×H×W → C·H·W, D → heads×dim);
- `Freeze(axis, why)`: the op is not equivariant along this axis; its space keeps the identity;
- `FactorAxis(op, tag, size)`: a factor of a product axis that no tensor carries (the groups of
  a grouped convolution or group norm, the units of one group), a part of a `Kron`;
- `Keep(axis, reduced)`: the op's result does not change under any permutation of this axis (a
  sum over it, a shape query), or the axis is linked elsewhere; nothing is linked here.
  `reduced` marks ops that combine all units of the axis (sum, mean, norm, softmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

__all__ = ["NodeAxis", "ParamAxis", "FactorAxis", "AxisRef", "Role", "Same", "Cat", "Kron", "Freeze", "Keep",
           "Link"]

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


@dataclass(frozen=True)
class FactorAxis:
    """A factor of a product axis that no tensor carries, named by the node of the op that sees
    it and a tag: "groups" (the groups of a grouped op: a transform moves them as wholes) or
    the units of one group ("in", "out", "units")."""

    op: str
    tag: str
    size: int

    def __str__(self) -> str:
        return f"{self.op}.{self.tag}({self.size})"


AxisRef = Union[NodeAxis, ParamAxis, FactorAxis]


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
    parts: tuple[NodeAxis | FactorAxis | int, ...]


@dataclass(frozen=True)
class Freeze:
    axis: NodeAxis
    why: str


@dataclass(frozen=True)
class Keep:
    """Nothing linked here; `reduced`: the op reads every unit of this axis together (a sum,
    mean, norm or softmax over it), so duplicating units would change its result."""

    axis: NodeAxis
    reduced: bool = False


Link = Union[Same, Cat, Kron, Freeze, Keep]



"""Shape constants that follow their spaces: which integer literals in the graph are widths.

A reshape to `[B, T, 32]`, a layer norm over `[32]` or a depthwise convolution with
`groups=32` holds the width of a space as a number. `find_literals` ties each such literal to
the space of the axis it sizes, from the op and the space table; `resize_literals` rewrites
them in a graph whose spaces changed width. Literals that are not widths (-1, sizes of frozen
axes, values read from other nodes) are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphmerge.graph.capture import Traced
from graphmerge.graph.kinds import arg_position, target_name
from graphmerge.graph.spaces import SpaceTable

__all__ = ["Literal", "find_literals", "merged_widths", "resize_literals"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Literal:
    """Argument `arg` of node `node` (element `index` of it when it is a list) is the width of
    space `space`."""

    node: str
    arg: int
    index: int | None
    space: int


_SIZE_OPS = {"view", "reshape", "_unsafe_view", "expand", "new_zeros", "new_ones", "new_empty",
             "new_full"}
_CONVS = {"conv1d", "conv2d", "conv3d"}
_SPLITS = {"split", "split_with_sizes"}


def _one_heads_width(table: SpaceTable, spaces: set) -> bool:
    """Whether the pieces' spaces are projections of one heads space (q, k, v of a fused
    projection) whose head dims share a width: their widths then stay equal in a merge."""
    for ks in table.heads.values():
        dims = dict(ks)
        if spaces <= dims.keys() and len({table[dims[s]].width for s in spaces}) == 1:
            return True
    return False


def _sizes(n: fx.Node) -> Iterator[tuple[int, int | None, int]]:
    """(arg, index, output axis) of each size literal of a reshape-like node."""
    if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)):
        for k, v in enumerate(n.args[1]):
            yield 1, k, k
    else:  # fx method form: x.view(b, t, c)
        for k in range(1, len(n.args)):
            yield k, None, k - 1


def find_literals(traced: Traced) -> list[Literal]:
    """Every integer literal of the graph that equals the width of the space of the axis it
    sizes. Cost: one pass over the nodes."""
    table = traced.space_table
    out: list[Literal] = []

    def tie(n: fx.Node, arg: int, index: int | None, node: str, dim: int) -> None:
        value = n.args[arg] if index is None else n.args[arg][index]
        space = table.space_of(node, dim)
        if isinstance(value, int) and not isinstance(value, bool) and space is not None \
                and value == space.width:
            out.append(Literal(n.name, arg, index, space.id))

    for n in traced.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        name = target_name(n)
        norm = arg_position(n, "normalized_shape")  # a norm's: the widths of its last axes
        if name in _SIZE_OPS:
            for arg, index, dim in _sizes(n):
                tie(n, arg, index, n.name, dim)
        elif name == "unflatten" and len(n.args) > 2 and isinstance(n.args[2], (list, tuple)):
            rank = len(traced.shapes.get(n.args[0].name) or ())
            dim = n.args[1] + rank if n.args[1] < 0 else n.args[1]  # x.unflatten(dim, sizes)
            for k in range(len(n.args[2])):
                tie(n, 2, k, n.name, dim + k)
        elif norm is not None and len(n.args) > norm and isinstance(n.args[norm], (list, tuple)):
            x = n.args[0]
            rank = len(traced.shapes.get(x.name) or ())
            for j in range(len(n.args[norm])):
                tie(n, norm, j, x.name, rank - len(n.args[norm]) + j)
        elif name in _SPLITS and len(n.args) > 1 and isinstance(n.args[0], fx.Node):
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            rank = len(traced.shapes.get(n.args[0].name) or ())
            dim = dim + rank if isinstance(dim, int) and dim < 0 else dim
            if isinstance(n.args[1], (list, tuple)):  # one size per piece
                for k in range(len(n.args[1])):
                    tie(n, 1, k, f"{n.name}#{k}", dim)
            else:  # one size for every piece: tied when every piece is one space's width
                pieces = len(traced.shapes.get(n.name) or ())
                spaces = {table.node_axes.get(f"{n.name}#{k}", {}).get(dim)
                          for k in range(pieces)}
                if len(spaces) == 1 or _one_heads_width(table, spaces):
                    tie(n, 1, None, f"{n.name}#0", dim)
        elif name in _CONVS and len(n.args) > 6 and isinstance(n.args[0], fx.Node):
            x, groups = n.args[0], n.args[6]
            shape = traced.shapes.get(x.name) or ()
            if len(shape) > 1 and groups == shape[1] and groups > 1:  # depthwise
                tie(n, 6, None, x.name, 1)
            else:
                _tie_groups(table, n, 6, x, out)
        elif name == "group_norm" and len(n.args) > 1 and isinstance(n.args[0], fx.Node):
            _tie_groups(table, n, 1, n.args[0], out)
    return out


def _tie_groups(table: SpaceTable, n: fx.Node, arg: int, x: fx.Node, out: list[Literal]) -> None:
    """A grouped op's number of groups (argument `arg` of `n`) is the width of the groups
    space of its input's channels (groups × units of one group)."""
    groups, space = n.args[arg], table.space_of(x.name, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 2 or space is None \
            or space.derived is None or space.derived.kind != "kron":
        return
    g = space.derived.parts[0]
    if g is not None and g in table.heads and table[g].width == groups:
        out.append(Literal(n.name, arg, None, g))


def merged_widths(table: SpaceTable, widths: Mapping[int, int]) -> dict[int, int]:
    """The width of every space after a rewrite that gives base spaces `widths` (others keep
    theirs; derived spaces follow their parts)."""
    out: dict[int, int] = {}

    def width(sid: int) -> int:
        if sid not in out:
            d = table[sid].derived
            if sid in widths or d is None:
                out[sid] = widths.get(sid, table[sid].width)
            else:
                parts = [w if p is None else width(p) for p, w in zip(d.parts, d.sizes)]
                out[sid] = sum(parts) if d.kind == "cat" else math.prod(parts)
        return out[sid]

    for s in table:
        width(s.id)
    return out


def resize_literals(gm: fx.GraphModule, literals: list[Literal],
                    widths: Mapping[int, int]) -> int:
    """Rewrite, in `gm` (a copy of the traced graph), every tied literal to its space's new
    width. Returns the number of literals changed; call `gm.recompile()` after."""
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for lit in literals:
        n, new = nodes.get(lit.node), widths.get(lit.space)
        if n is None or new is None:
            continue
        args: list[Any] = list(n.args)
        if lit.index is None:
            if args[lit.arg] != new:
                args[lit.arg] = new
                changed += 1
        else:
            seq = list(args[lit.arg])
            if seq[lit.index] != new:
                seq[lit.index] = new
                changed += 1
            args[lit.arg] = type(n.args[lit.arg])(seq)
        n.args = tuple(args)
    return changed

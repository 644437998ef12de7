"""Shape constants that follow their spaces: which integer literals in the graph are widths.

A reshape to `[B, T, 32]`, a layer norm over `[32]` or a depthwise convolution with
`groups=32` holds the width of a space as a number. `find_literals` ties each such literal to
the space of the axis it sizes, from the op and the space table; `resize_literals` rewrites
them in a graph whose spaces changed width. A slice bound (`s[:, r:]`, `aten.slice`,
`narrow`) is the offset of a piece in the cat of its axis: a sum of widths of the parts before
it (or, when negative, from it to the end). Literals that are not widths (-1, sizes of frozen
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
from graphmerge.graph.rules.shape import index_axes
from graphmerge.graph.spaces import SpaceTable

__all__ = ["Literal", "find_literals", "merged_widths", "resize_literals", "module_groups"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Literal:
    """Argument `arg` of node `node` (element `index` of it when it is a list) is the width of
    space `space`."""

    node: str
    arg: int
    index: int | None
    space: int
    # a slice bound: the offset of a piece in the cat of its axis, `sign` · (Σ widths of the
    # `terms` (space id, width) + `fixed`); `bound` names the field of a slice object
    terms: tuple[tuple[int, int], ...] = ()
    fixed: int = 0
    sign: int = 1
    bound: str | None = None
    # an attention's default scale (1/√E of its query head dim, space `space`, of width
    # `fixed`): pinned as the keyword `scale` when that width changes, so the scale stays
    scale: bool = False
    # a ratio: the width of `space` over that of space `per` (a repeat count: the group of
    # grouped-query attention, the keys' heads repeated into the queries' heads × group)
    per: int | None = None

    def value(self, widths: Mapping[int, int]) -> int | float | None:
        """The literal for spaces of `widths` (a plain width: None when its space is absent;
        a scale: None while its head dim keeps its width)."""
        if self.per is not None:
            whole, part = widths.get(self.space), widths.get(self.per)
            return None if not whole or not part else whole // part
        if self.scale:
            return None if widths.get(self.space, self.fixed) == self.fixed \
                else 1.0 / math.sqrt(self.fixed)
        if not self.terms:
            return widths.get(self.space)
        return self.sign * (self.fixed + sum(widths.get(s, w) for s, w in self.terms))


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
            if name == "expand":
                out.extend(_expanded_groups(traced, n))
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
        elif (name in ("getitem", "narrow") or n.target is aten.slice.Tensor) and n.args \
                and isinstance(n.args[0], fx.Node):
            out.extend(_slice_bounds(traced, n))
        elif name in _CONVS and len(n.args) > 6 and isinstance(n.args[0], fx.Node):
            x, groups = n.args[0], n.args[6]
            shape = traced.shapes.get(x.name) or ()
            if len(shape) > 1 and groups == shape[1] and groups > 1:  # depthwise
                tie(n, 6, None, x.name, 1)
            else:
                _tie_groups(table, n, 6, x, out)
        elif name == "group_norm" and len(n.args) > 1 and isinstance(n.args[0], fx.Node):
            _tie_groups(table, n, 1, n.args[0], out)
        elif name == "scaled_dot_product_attention":
            out.extend(_default_scale(traced, n))
        elif name == "repeat_interleave" and len(n.args) > 1 and isinstance(n.args[0], fx.Node):
            out.extend(_repeats(traced, n))
    return out


def _repeats(traced: Traced, n: fx.Node) -> Iterator[Literal]:
    """repeat_interleave(x, repeats, dim) along an axis whose output is x's space × a part
    of `repeats` units (the keys' heads repeated for each query of a group): the repeat
    count is the ratio of the two widths."""
    repeats = n.args[1]
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    rank = len(traced.shapes.get(n.args[0].name) or ())
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not isinstance(dim, int) \
            or not rank:
        return
    table = traced.space_table
    src, dst = table.space_of(n.args[0].name, dim % rank), table.space_of(n.name, dim % rank)
    if src is not None and dst is not None and dst.derived is not None and \
            dst.derived.kind == "kron" and dst.derived.parts[0] == src.id and \
            dst.width == src.width * repeats:
        yield Literal(n.name, 1, None, dst.id, per=src.id)


def _expanded_groups(traced: Traced, n: fx.Node) -> Iterator[Literal]:
    """x[:, :, None].expand(b, h, g, ...).reshape(b, h * g, ...): the keys' heads repeated
    for each query of a group by a broadcast, where the reshape's axis is x's heads space × a
    part of g units (grouped-query attention as transformers writes it). The broadcast size g
    is the ratio of the two widths, like `repeat_interleave`'s repeat count."""
    table, shapes = traced.space_table, traced.shapes
    x, users = n.args[0], list(n.users)
    src_shape, out_shape = shapes.get(x.name) if isinstance(x, fx.Node) else None, \
        shapes.get(n.name)
    if not src_shape or not out_shape or len(src_shape) != len(out_shape) or len(users) != 1 \
            or target_name(users[0]) not in ("view", "reshape", "_unsafe_view"):
        return
    after = shapes.get(users[0].name) or ()
    for arg, index, dim in _sizes(n):
        value = n.args[arg] if index is None else n.args[arg][index]
        heads = table.space_of(n.name, dim - 1) if dim > 0 else None
        if src_shape[dim] != 1 or not isinstance(value, int) or isinstance(value, bool) or \
                value < 2 or heads is None or table.space_of(n.name, dim) is not None:
            continue
        for j in range(len(after)):  # the axis the reshape makes of heads × group
            whole = table.space_of(users[0].name, j)
            if whole is not None and whole.derived is not None and \
                    whole.derived.kind == "kron" and whole.derived.parts[0] == heads.id \
                    and whole.width == heads.width * value:
                yield Literal(n.name, arg, index, whole.id, per=heads.id)
                break


def _default_scale(traced: Traced, n: fx.Node) -> Iterator[Literal]:
    """The default scale of scaled_dot_product_attention (no `scale` given) depends on the
    width of the queries' last axis: tied to that space, to be pinned when it changes."""
    given = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
    q = n.args[0] if n.args else n.kwargs.get("query")
    rank = len(traced.shapes.get(q.name) or ()) if isinstance(q, fx.Node) else 0
    space = traced.space_table.space_of(q.name, rank - 1) if rank else None
    if given is None and space is not None:
        yield Literal(n.name, 6, None, space.id, fixed=space.width, scale=True)


def _slice_bounds(traced: Traced, n: fx.Node) -> Iterator[Literal]:
    """The bounds of a slice (fx getitem, aten.slice, narrow) along an axis that is a cat of
    pieces: each is the offset of a piece, from the start (≥ 0) or from the end (< 0); the
    length of a narrow is the piece's width."""
    shape = traced.shapes.get(n.args[0].name)
    if not isinstance(shape, tuple) or not all(isinstance(w, int) for w in shape):
        return
    axes, places = _sliced_axes(n, len(shape))
    table = traced.space_table
    for k, d_in, d_out, i in axes:
        whole, piece = table.space_of(n.args[0].name, d_in), table.space_of(n.name, d_out)
        if not isinstance(i, slice) or whole is None or piece is None or \
                whole.derived is None or whole.derived.kind != "cat" or not all(
                    b is None or isinstance(b, int) for b in (i.start, i.stop, i.step)):
            continue  # bounds read from other nodes (sizes) follow the shapes by themselves
        start = i.indices(shape[d_in])[0]
        parts = list(zip(whole.derived.parts, whole.derived.sizes))
        at = [j for j in range(len(parts)) if parts[j][0] == piece.id
              and sum(w for _, w in parts[:j]) == start]
        for bound, cut in (("start", at[0]), ("stop", at[0] + 1)) if at else ():
            value = getattr(i, bound)
            if bound not in places or not isinstance(value, int) or isinstance(value, bool):
                continue
            terms = parts[:cut] if value >= 0 else parts[cut:]
            arg, element, field = places[bound]
            lit = Literal(n.name, arg, k if element else None, piece.id, tuple(
                (s, w) for s, w in terms if s is not None), sum(
                w for s, w in terms if s is None), -1 if value < 0 else 1, field)
            if lit.terms and lit.value({}) == value:
                yield lit
        if target_name(n) == "narrow" and n.args[3] == piece.width:
            yield Literal(n.name, 3, None, piece.id)


def _sliced_axes(n: fx.Node, rank: int) -> tuple[list, dict[str, tuple]]:
    """(position, input axis, output axis, slice) of each axis a slicing node indexes, and
    where its start and stop are: bound -> (argument, whether it is the element at that
    position of the argument, the field of the slice object or None)."""
    name = target_name(n)
    if n.target is aten.slice.Tensor or name == "narrow":
        dim, start, end = (n.args[k] if len(n.args) > k else None for k in (1, 2, 3))
        dim = 0 if dim is None else dim
        if name == "narrow":  # narrow(x, dim, start, length): its stop is not an argument
            if not isinstance(start, int) or not isinstance(end, int):
                return [], {}
            end = start + end
        axes = [(None, dim % rank, dim % rank, slice(start, end))] if isinstance(dim, int) \
            else []
        return axes, {"start": (2, False, None), **({} if name == "narrow" else {
            "stop": (3, False, None)})}
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    if not all(i is None or isinstance(i, (int, slice)) or i is Ellipsis for i in idx):
        return [], {}
    one = not isinstance(n.args[1], tuple)  # x[a:b]: the slice is the argument itself
    return list(index_axes(idx, rank)), {b: (1, not one, b) for b in (
        "start", "stop")}


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
    theirs; derived spaces follow their parts). A head dim not given follows its projection
    and heads when both are given (projection = heads × group × head dim)."""
    out: dict[int, int] = {}
    widths = dict(widths)
    for h, ks in table.heads.items():
        for k, d in ks:  # heads × head dim first, then heads × group × head dim
            if h in widths and k in widths and d not in widths and widths[h] and \
                    k not in table.head_groups:
                widths[d] = widths[k] // widths[h]
        for k, d in ks:  # the group follows: (heads × group) × head dim
            parts = table[k].derived.parts if table[k].derived is not None else ()
            if k in table.head_groups and k in widths and d in widths and len(parts) == 2 \
                    and parts[1] == d and parts[0] is not None and parts[0] not in widths:
                widths[parts[0]] = widths[k] // widths[d]

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
        n, new = nodes.get(lit.node), lit.value(widths)
        if n is None or new is None:
            continue
        if lit.scale:  # a keyword (keyword-only in aten) unless given in its place
            if len(n.args) > lit.arg:
                n.args = (*n.args[:lit.arg], new, *n.args[lit.arg + 1:])
            else:
                n.kwargs = {**n.kwargs, "scale": new}
            changed += 1
            continue
        args: list[Any] = list(n.args)
        seq = [args[lit.arg]] if lit.index is None else list(args[lit.arg])
        k = lit.index or 0
        old = seq[k]
        seq[k] = new if lit.bound is None else slice(*(
            new if f == lit.bound else getattr(old, f) for f in ("start", "stop", "step")))
        changed += seq[k] != old
        args[lit.arg] = seq[0] if lit.index is None else type(n.args[lit.arg])(seq)
        n.args = tuple(args)
    return changed


def module_groups(traced: Traced, widths: Mapping[int, int]) -> dict[str, int]:
    """The number of groups of each grouped module (a grouped convolution, a GroupNorm) whose
    input channels are groups × units of one group, for spaces of `widths` (as
    `merged_widths` gives them): the width of its groups space. By module path, for
    `sync_module_attributes` (groups held as module attributes, not as graph literals)."""
    table = traced.space_table
    out: dict[str, int] = {}
    for n in traced.graph.nodes:
        if n.op != "call_module" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        m = traced.graph_module.get_submodule(n.target)
        groups = getattr(m, "num_groups", getattr(m, "groups", 1))
        space = table.space_of(n.args[0].name, 1)
        if not isinstance(groups, int) or groups < 2 or space is None or \
                space.derived is None or space.derived.kind != "kron":
            continue
        g = space.derived.parts[0]
        if g is not None and g in table.heads and table[g].width == groups and g in widths:
            out[n.target] = widths[g]
    return out

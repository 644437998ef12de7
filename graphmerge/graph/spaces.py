"""Spaces: groups of tensor and parameter axes that must share one transform.

`find_spaces(traced)` runs every op's axis rule (`graphmerge.graph.rules`), joins the linked axes in a
union-find, resolves derived axes (cat/split → concatenation, flatten/heads → row-major product),
freezes what touches the graph's inputs and outputs or an op without a rule, and returns a
`SpaceTable`. Cost: O(number of node axes · α) plus one pass over the derivations.
"""

from __future__ import annotations

import enum
import logging
import math
import warnings
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch.fx as fx

from graphmerge.errors import GraphmergeError, summarize
from graphmerge.graph.axes import Cat, FactorAxis, Freeze, Keep, Kron, NodeAxis, ParamAxis, Same
from graphmerge.graph.capture import Traced
from graphmerge.graph.rules import RULES, Op, rule_for
from graphmerge.graph.unionfind import UnionFind
from graphmerge.graph.tensors import canonical_names, named_tensors

__all__ = ["Space", "Derivation", "SpaceTable", "FrozenBy", "Frozen", "find_spaces",
           "UnsupportedOpWarning"]

log = logging.getLogger(__name__)

Key = tuple  # ("n", node, dim) node axes, ("p", param, dim) parameter axes, ("v", op, tag) factors


class UnsupportedOpWarning(UserWarning):
    """An op had no axis rule; the axes it touches were frozen."""


class FrozenBy(enum.Enum):
    """What froze a space (its transform stays the identity)."""

    GRAPH_INPUT = "touches a graph input"
    GRAPH_OUTPUT = "touches the graph output"
    NO_RULE = "an op without an axis rule"
    NOT_PRESERVED = "an op that does not preserve the axis"
    RULE = "an op's axis rule"
    DERIVED_CONFLICT = "derived from its parts in two incompatible ways"
    DERIVED_CYCLE = "derived from itself (cyclic cat/reshape)"
    HEADS = ("a product of transformable axes that is not attention heads (heads × head dim) "
             "as the graph shows them")
    THROUGH_DERIVED = "a frozen derived space it is part of"
    CONSTANT = "a tensor constant that the forward code creates"
    NO_FEATURES = "no activation carries it (only parameters or constants), nothing to match on"
    ALL_PARTS_FROZEN = "all its parts are frozen"


@dataclass(frozen=True)
class Frozen:
    """Why a space is frozen: the kind, and where (node, op, detail) when one op did it."""

    by: FrozenBy
    node: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        text = self.detail or self.by.value
        return f"{text} (node `{self.node}`)" if self.node else text


@dataclass(frozen=True)
class Derivation:
    """How a derived space is built from others.

    kind "cat": the axis is the concatenation of the parts (block-diagonal transform);
    kind "kron": the axis is the row-major product of the parts (Kronecker transform), e.g.
    flatten C×H×W → C·H·W is kron(channels, H, W) with H and W kept as identity.
    `parts[k]` is a space id, or None for a part that always keeps the identity; `sizes[k]` its width.
    """

    kind: Literal["cat", "kron"]
    parts: tuple[int | None, ...]
    sizes: tuple[int, ...]


@dataclass
class Space:
    """One shared transform. Widths are sizes of the axis; roles as in docs/design.md.

    Attributes:
        id: index in the space table.
        width: d, the size of every axis in the space.
        frozen_by: why the space keeps the identity transform (None: the space is free);
            `frozen` and `why` read it.
        producers: parameter axes that write values in the space (`out`: weight rows, biases,
            norm affine, running statistics), as ParamAxis(name, dim, "out").
        consumers: parameter axes that read the space (`in`: weight columns).
        members: node axes whose values live in the space.
        reads: the activations the space is matched on: the node axes its consumers read (or
            its last activation) and its first activation (the producer's output). Never a
            parameter or a constant.
        derived: for a derived space, how it is built from other spaces; else None.
        reduced: some op combines all units of the space (a sum, mean, norm or softmax over
            it): adding duplicate units would change the function.
    """

    id: int
    width: int
    frozen_by: Frozen | None = None
    producers: list[ParamAxis] = field(default_factory=list)
    consumers: list[ParamAxis] = field(default_factory=list)
    members: list[NodeAxis] = field(default_factory=list)
    reads: list[NodeAxis] = field(default_factory=list)
    derived: Derivation | None = None
    reduced: bool = False

    @property
    def frozen(self) -> bool:
        return self.frozen_by is not None

    @property
    def why(self) -> str | None:
        """Why the space is frozen, as text (None if it is free)."""
        return None if self.frozen_by is None else str(self.frozen_by)

    @property
    def params(self) -> list[ParamAxis]:
        return self.producers + self.consumers

    def __repr__(self) -> str:
        state = f"frozen: {self.why}" if self.frozen else "free"
        kind = f", {self.derived.kind} of {list(self.derived.parts)}" if self.derived else ""
        return (f"Space({self.id}, width={self.width}, {state}{kind}, "
                f"{len(self.producers)} out / {len(self.consumers)} in)")


@dataclass
class SpaceTable:
    """All spaces of one traced model, with look-ups from axes to spaces."""

    spaces: list[Space]
    param_axes: dict[str, dict[int, int]]  # parameter name -> {dim: space id}
    node_axes: dict[str, dict[int, int]]   # node name -> {dim: space id}
    unsupported: dict[str, list[str]]      # op name -> nodes that had no rule
    # attention: heads space id -> [(kron space id, head-dim space id)], one per projection
    # laid out heads × head dim (q, k, v, the output projection's input)
    heads: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # grouped-query attention: a projection laid out heads × group × head dim (the queries
    # of several heads share one key/value head) -> the group's width (the group keeps the
    # identity: query heads stay in their order within their key/value head's group)
    head_groups: dict[int, int] = field(default_factory=dict)
    # head dims with one transform shared by every head (the units of one group of a grouped
    # convolution, which its weight reads the same in every group); others move head by head
    shared_dims: set[int] = field(default_factory=set)

    def __iter__(self) -> Iterator[Space]:
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)

    def __getitem__(self, i: int) -> Space:
        return self.spaces[i]

    @property
    def free(self) -> list[Space]:
        return [s for s in self.spaces if not s.frozen]

    def space_of(self, node: str, dim: int) -> Space | None:
        i = self.node_axes.get(node, {}).get(dim)
        return None if i is None else self.spaces[i]

    def format(self, max_names: int = 3) -> str:
        """A plain-text table: id, width, state, producers, consumers."""
        def names(axes: list[ParamAxis]) -> str:
            shown = [f"{a.param}[{a.dim}]" for a in axes[:max_names]]
            more = len(axes) - len(shown)
            return ", ".join(shown) + (f" (+{more})" if more > 0 else "") if axes else "-"

        rows = [("id", "width", "state", "producers (out)", "consumers (in)")]
        for s in self.spaces:
            state = "free" if not s.frozen else f"frozen: {s.why}"
            if s.derived:
                parts = ",".join("·" if p is None else str(p) for p in s.derived.parts)
                state += f" [{s.derived.kind}({parts})]"
            rows.append((str(s.id), str(s.width), state, names(s.producers), names(s.consumers)))
        widths = [min(max(len(r[c]) for r in rows), 60) for c in range(5)]
        lines = ["  ".join(cell[:60].ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        n_free = len(self.free)
        lines.append(f"{len(self.spaces)} spaces: {n_free} free, {len(self.spaces) - n_free} frozen")
        return "\n".join(lines)


def _key(a: NodeAxis | ParamAxis | FactorAxis) -> Key:
    if isinstance(a, FactorAxis):
        return ("v", a.op, a.tag)
    return ("n", a.node, a.dim) if isinstance(a, NodeAxis) else ("p", a.param, a.dim)


class _Builder:
    """Collects the links of every op, then resolves them into spaces."""

    def __init__(self, traced: Traced) -> None:
        self.traced = traced
        self.gm = traced.graph_module
        self.uf = UnionFind()
        self.size: dict[Key, int] = {}
        self.frozen: dict[Key, Frozen] = {}
        self.roles: dict[Key, set[str]] = {}
        self.reads: list[tuple[Key, Key]] = []  # (node axis read, parameter axis reading it)
        self.reduced: set[Key] = set()  # node axes some op combines all units of
        self.derivations: list[tuple[Key, str, tuple[Key | int, ...]]] = []
        self.unsupported: dict[str, list[str]] = {}
        self.params = named_tensors(self.gm)
        self.canonical = canonical_names(self.gm)  # tied weights: one name, so their axes join
        self.data_nodes = _data_nodes(self.gm.graph)

    # ---- sizes and elements ----------------------------------------------------------------
    def node_shape(self, name: str) -> tuple[int, ...] | None:
        base, _, piece = name.partition("#")
        s = self.traced.shapes.get(base)
        if piece and s is not None:
            s = s[int(piece)]
        return s if isinstance(s, tuple) and all(isinstance(d, int) for d in s) else None

    def add(self, a: NodeAxis | ParamAxis | FactorAxis) -> Key:
        if isinstance(a, FactorAxis):
            k = _key(a)
            if k not in self.size:
                self.size[k] = a.size
                self.uf.add(k)
            return k
        if isinstance(a, ParamAxis):
            a = ParamAxis(self.canonical.get(a.param, a.param), a.dim, a.role)
        k = _key(a)
        if k not in self.size:
            if isinstance(a, NodeAxis):
                self.size[k] = self.node_shape(a.node)[a.dim]
            else:
                self.size[k] = self.params[a.param].shape[a.dim]
            self.uf.add(k)
        if isinstance(a, ParamAxis) and a.role != "auto":
            self.roles.setdefault(k, set()).add(a.role)
        return k

    def node_axes(self, n: fx.Node) -> list[NodeAxis]:
        """All axes of size > 1 of a node's value (of each tensor piece for tuple values; a
        nested tuple's pieces have axes at the getitem nodes that take them out)."""
        s = self.traced.shapes.get(n.name)
        if s is None:
            return []
        if all(isinstance(d, int) for d in s):
            return [NodeAxis(n.name, d) for d, w in enumerate(s) if w > 1]
        return [NodeAxis(f"{n.name}#{k}", d) for k, p in enumerate(s)
                if p is not None and all(isinstance(w, int) for w in p)
                for d, w in enumerate(p) if w > 1]

    def is_data(self, a: NodeAxis) -> bool:
        """Whether the axis belongs to an activation (a value computed from the inputs), not to
        a parameter or a constant: only activations are features to correlate."""
        return a.node.partition("#")[0] in self.data_nodes

    def freeze(self, a: NodeAxis, why: Frozen) -> None:
        self.frozen.setdefault(self.add(a), why)

    # ---- links -----------------------------------------------------------------------------
    def run_rules(self) -> None:
        modules = dict(self.gm.named_modules())
        consts = {k: v for k, v in self.traced.consts.items()}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                for a in self.node_axes(n):
                    self.freeze(a, Frozen(FrozenBy.GRAPH_INPUT, n.name))
                continue
            if n.op == "output":
                outs: list[fx.Node] = []
                fx.node.map_arg(n.args, lambda x: outs.append(x) or x)
                for o in outs:
                    for a in self.node_axes(o):
                        self.freeze(a, Frozen(FrozenBy.GRAPH_OUTPUT))
                continue
            if n.op == "get_attr" and n.target in self.traced.constants:
                for a in self.node_axes(n):  # made by the forward code: no copy can permute it
                    self.freeze(a, Frozen(FrozenBy.CONSTANT, n.name))
                continue
            module = modules.get(n.target) if n.op == "call_module" else None
            op = Op(n, module, self.traced.shapes, consts)
            rule = RULES["get_attr"] if n.op == "get_attr" else rule_for(n, module)
            touched = self.node_axes(n) + [a for t in op.tensor_args() for a in self.node_axes(t)]
            if rule is None:
                self.unsupported.setdefault(op.name, []).append(n.name)
                for a in touched:
                    self.freeze(a, Frozen(FrozenBy.NO_RULE, n.name,
                                          f"no axis rule for `{op.name}`"))
                continue
            mentioned: set[Key] = set()
            try:
                for link in rule(op):
                    mentioned.update(self.apply(link, op))
            except GraphmergeError:
                raise
            except Exception as e:
                raise GraphmergeError(
                    f"the axis rule for `{op.name}` failed at node `{n.name}`: "
                    f"{summarize(e)}. Trace that block as a leaf module to freeze it, "
                    f"or fix the rule in graphmerge/graph/rules/."
                ) from e
            for a in touched:
                if _key(a) not in mentioned:
                    self.freeze(a, Frozen(FrozenBy.NOT_PRESERVED, n.name,
                                          f"`{op.name}` does not preserve axis {a.dim} of "
                                          f"`{a.node}`"))
        for name, nodes in self.unsupported.items():
            warnings.warn(
                f"no axis rule for `{name}` (node{'s' if len(nodes) > 1 else ''} "
                f"{', '.join(nodes[:5])}); the axes it touches were frozen. Register a rule with "
                f"graphmerge.graph.rules.register or trace that block as a leaf module.",
                UnsupportedOpWarning, stacklevel=3)

    def apply(self, link: Any, op: Op) -> list[Key]:
        if isinstance(link, Same):
            keys = [self.add(a) for a in link.axes]
            sizes = {self.size[k] for k in keys}
            if len(sizes) > 1:
                raise GraphmergeError(
                    f"the axis rule for `{op.name}` at node `{op.node.name}` links axes of "
                    f"different sizes: {', '.join(f'{a}={self.size[_key(a)]}' for a in link.axes)}"
                )
            if keys:
                self.uf.union(*keys)
            for a in link.axes:
                if isinstance(a, ParamAxis) and a.role == "in":
                    self.reads.extend((_key(b), _key(a)) for b in link.axes
                                      if isinstance(b, NodeAxis) and self.is_data(b))
            return keys
        if isinstance(link, (Cat, Kron)):
            whole = self.add(link.whole)
            parts = tuple(p if isinstance(p, int) else self.add(p) for p in link.parts)
            widths = [p if isinstance(p, int) else self.size[p] for p in parts]
            total = sum(widths) if isinstance(link, Cat) else math.prod(widths)
            if total != self.size[whole]:
                raise GraphmergeError(
                    f"the axis rule for `{op.name}` at node `{op.node.name}` derives an axis of "
                    f"width {self.size[whole]} from parts {widths}")
            self.derivations.append((whole, "cat" if isinstance(link, Cat) else "kron", parts))
            return [whole, *(p for p in parts if not isinstance(p, int))]
        if isinstance(link, Freeze):
            self.freeze(link.axis, Frozen(FrozenBy.RULE, op.node.name, link.why))
            return [_key(link.axis)]
        if isinstance(link, Keep):
            key = self.add(link.axis)
            if link.reduced:
                self.reduced.add(key)
            return [key]
        raise TypeError(f"unknown link {link!r}")

    # ---- resolution ------------------------------------------------------------------------
    def resolve_derivations(self) -> dict[Hashable, tuple[str, tuple[Hashable | int, ...]]]:
        """One derivation per root: derivations of one root with one structure unify their
        parts, and cats whose cuts refine each other (the slices x[:, :r] and x[:, r:] of one
        tensor) merge into their common refinement (`_refine_cats`); incompatible ones freeze
        the root and its parts."""
        conflicts: set[Hashable] = set()
        grouped: set[Hashable] = set()  # conflicts where a grouped op's groups take part
        cut: set[Hashable] = set()  # conflicts of two cats: a piece cut by another's bounds
        while True:
            by_root: dict[Hashable, tuple[str, tuple]] = {}
            changed = False
            for whole, kind, parts in self.derivations:
                root = self.uf.find(whole)
                rparts = tuple(p if isinstance(p, int) else self.uf.find(p) for p in parts)
                if root not in by_root:
                    by_root[root] = (kind, rparts)
                    continue
                kind0, parts0 = by_root[root]
                refined = self._refine_cats(parts0, rparts) if kind0 == kind == "cat" else None
                if refined is not None:
                    by_root[root] = (kind, refined[0])
                    for p, q in refined[1]:
                        if p != q:
                            self.uf.union(p, q)
                            changed = True
                elif (kind0, self._widths(parts0)) == (kind, self._widths(rparts)):
                    for p, q in zip(parts0, rparts):
                        if isinstance(p, int) != isinstance(q, int):
                            conflicts.add(q if isinstance(p, int) else p)
                        elif not isinstance(p, int) and p != q:
                            self.uf.union(p, q)
                            changed = True
                elif (kind0, parts0) != (kind, rparts):
                    parts = [root, *(p for p in (*parts0, *rparts) if not isinstance(p, int))]
                    conflicts.update(parts)
                    if any(p[0] == "v" for p in (*parts0, *rparts) if not isinstance(p, int)):
                        grouped.update(parts)
                    elif kind0 == kind == "cat":
                        cut.update(parts)
            if not changed:
                break
        for c in conflicts:
            self.frozen.setdefault(c, Frozen(FrozenBy.DERIVED_CONFLICT, detail=(
                "its channels are grouped in two incompatible ways (grouped convolutions or "
                "group norms with different numbers of groups)") if c in grouped else (
                "pieces that overlap without one containing the other (slices or splits "
                "cut at different places)") if c in cut else ""))
        # cycles (a root among its own parts, directly or through other derived roots) freeze
        for root in list(by_root):
            if self._reaches(by_root, root, root):
                self.frozen.setdefault(root, Frozen(FrozenBy.DERIVED_CYCLE))
        return by_root

    def _refine_cats(self, a: tuple, b: tuple) -> tuple[tuple, list[tuple]] | None:
        """The common refinement of two cats of one axis, or None if an axis part of one
        would be cut by the other. A bare width of one side (what a slice leaves out) is cut
        at the other side's boundaries and takes its axes; equal spans pair their axes.
        Returns (merged parts, pairs of axis parts to unify). A cat that holds one space
        twice (rotate-half of a rotary embedding: cat of one frequency axis with itself, then
        its halves sliced) is not refined: it keeps the checks of equal cats below."""
        if _repeats(a) or _repeats(b):
            return None
        a, b, out, pairs = list(a), list(b), [], []
        while a and b:
            p, q = a.pop(0), b.pop(0)
            wp, wq = self._widths((p, q))
            if wp == wq:
                out.append(p if isinstance(q, int) else q)
                if not isinstance(p, int) and not isinstance(q, int):
                    pairs.append((p, q))
                continue
            (short, ws), (long, wl), rest = ((p, wp), (q, wq), b) if wp < wq else (
                (q, wq), (p, wp), a)
            if not isinstance(long, int):
                return None  # an axis cut in two: no block-diagonal transform
            out.append(short)
            rest.insert(0, wl - ws)
        if a or b or _repeats(tuple(out), pairs):
            return None
        return tuple(out), pairs

    def _widths(self, parts: tuple) -> tuple[int, ...]:
        return tuple(p if isinstance(p, int) else self.size[p] for p in parts)

    def _reaches(self, by_root: dict, start: Hashable, target: Hashable) -> bool:
        stack, seen = [p for p in by_root[start][1] if not isinstance(p, int)], set()
        while stack:
            r = self.uf.find(stack.pop())
            if r == target:
                return True
            if r in seen or r not in by_root:
                continue
            seen.add(r)
            stack.extend(p for p in by_root[r][1] if not isinstance(p, int))
        return False

    def build(self) -> SpaceTable:
        """Run every rule, resolve the derivations and make the table: the roots that become
        spaces, in graph order, with their members, derivations, reads and heads."""
        self.run_rules()
        derived = self.resolve_derivations()
        groups = self.uf.groups()
        heads = self.find_heads(derived, self._frozen_roots(), groups)
        frozen_roots = self._propagate_frozen(derived, heads.frozen)
        order = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        keep = self._kept_roots(derived, frozen_roots, groups, order)
        ids = {r: i for i, r in enumerate(keep)}
        spaces = [self._space(ids[r], groups[r], frozen_roots.get(r)) for r in keep]
        self._add_derivations(spaces, keep, ids, derived)
        self._add_reads(spaces, ids)
        param_axes, node_axes = self._axes_by_tensor(keep, groups, ids)
        head_table, head_groups = self._head_table(spaces, ids, heads, node_axes)
        self._add_features(spaces, order, {x for ks in head_table.items()
                                           for x in (ks[0], *(d for _, d in ks[1]))})
        shared = {ids[d] for d in heads.shared if d in ids
                  and any(ids[d] in (e for _, e in ks) for ks in head_table.values())}
        log.debug("found %d spaces (%d frozen)", len(spaces), sum(s.frozen for s in spaces))
        return SpaceTable(spaces, param_axes, node_axes, self.unsupported, head_table,
                          head_groups, shared)

    def _frozen_roots(self) -> dict[Hashable, Frozen]:
        """Root -> why, for the roots with a frozen member (the first reason found)."""
        frozen_roots: dict[Hashable, Frozen] = {}
        for k, why in self.frozen.items():
            frozen_roots.setdefault(self.uf.find(k), why)
        return frozen_roots

    def _propagate_frozen(self, derived: dict,
                          frozen_roots: dict[Hashable, Frozen]) -> dict[Hashable, Frozen]:
        """`frozen_roots` and what follows: a frozen derived space freezes its parts, and a
        derived space all of whose parts keep the identity keeps it too. Returns a new dict."""
        find = self.uf.find
        frozen_roots = dict(frozen_roots)
        stack = list(frozen_roots)
        while stack:
            r = stack.pop()
            for p in derived.get(r, (None, ()))[1]:
                if not isinstance(p, int) and find(p) not in frozen_roots:
                    frozen_roots[find(p)] = Frozen(FrozenBy.THROUGH_DERIVED, detail=(
                        f"{frozen_roots[r]} (through a derived space)"))
                    stack.append(find(p))
        changed = True
        while changed:
            changed = False
            for r, (_, parts) in derived.items():
                if r not in frozen_roots and all(
                        isinstance(p, int) or find(p) in frozen_roots for p in parts):
                    frozen_roots[r] = Frozen(FrozenBy.ALL_PARTS_FROZEN)
                    changed = True
        return frozen_roots

    def _kept_roots(self, derived: dict, frozen_roots: dict[Hashable, Frozen], groups: dict,
                    order: dict[str, int]) -> list[Hashable]:
        """The roots that become spaces, by first appearance of a member in the graph: those
        that can be realised (they have parameters, or are parts of a derived space that has),
        except base spaces that are frozen ones without parameters of their own (e.g. the H
        and W parts of a flatten)."""
        find = self.uf.find
        has_param = {r for r, ms in groups.items() if any(m[0] == "p" for m in ms)}
        realisable = set(has_param)
        stack = [r for r in derived if r in has_param]
        while stack:
            r = stack.pop()
            for p in derived[r][1]:
                if not isinstance(p, int) and find(p) not in realisable:
                    realisable.add(find(p))
                    if find(p) in derived:
                        stack.append(find(p))
        # a derived axis with a free realisable part moves with it (B·C of a reshape that
        # folds channels into the batch): a space, though it has no parameters of its own
        grown = True
        while grown:
            grown = False
            for r, (_, parts) in derived.items():
                if r not in realisable and any(
                        not isinstance(p, int) and find(p) in realisable
                        and find(p) not in frozen_roots for p in parts):
                    realisable.add(r)
                    grown = True

        def first_seen(r: Hashable) -> tuple[int, str]:
            ms = groups[r]
            nodes = [order.get(m[1].partition("#")[0], 1 << 30) for m in ms if m[0] == "n"]
            return (min(nodes) if nodes else 1 << 30, str(ms[0]))

        keep = [r for r in groups
                if (r in derived and r in realisable)
                or (r not in derived and r in realisable
                    and (r in has_param or r not in frozen_roots))]
        keep.sort(key=first_seen)
        return keep

    def _space(self, i: int, ms: list[Key], frozen_by: Frozen | None) -> Space:
        """Space `i` of the members `ms` of one root: node axes, producers and consumers."""
        s = Space(id=i, width=self.size[ms[0]])
        s.frozen_by = frozen_by
        s.reduced = any(m in self.reduced for m in ms)
        for m in ms:
            if m[0] == "n":
                s.members.append(NodeAxis(m[1], m[2]))
            elif m[0] == "p":
                # an axis both written and read (tied weights) is a producer
                role = "in" if self.roles.get(m) == {"in"} else "out"
                (s.consumers if role == "in" else s.producers).append(
                    ParamAxis(m[1], m[2], role))
        return s

    def _add_derivations(self, spaces: list[Space], keep: list[Hashable],
                         ids: dict[Hashable, int], derived: dict) -> None:
        """Each derived space's Derivation, its parts as space ids (None: not a space)."""
        find = self.uf.find
        for r in keep:
            if r in derived:
                kind, parts = derived[r]
                spaces[ids[r]].derived = Derivation(
                    kind, tuple(None if isinstance(p, int) else ids.get(find(p)) for p in parts),
                    self._widths(tuple(p if isinstance(p, int) else find(p) for p in parts)))

    def _add_reads(self, spaces: list[Space], ids: dict[Hashable, int]) -> None:
        """The activation axes that parameters read, on the spaces they belong to."""
        for node_key, param_key in self.reads:
            r = self.uf.find(node_key)
            if r in ids:
                a = NodeAxis(node_key[1], node_key[2])
                if a not in spaces[ids[r]].reads:
                    spaces[ids[r]].reads.append(a)

    def _add_features(self, spaces: list[Space], order: dict[str, int], heads: set[int]
                      ) -> None:
        """The features of each free base space: what the consumers read (else the last
        activation), and the first activation, as the producer wrote it: a unit that a
        nonlinearity makes constant on the data (a dead ReLU) is still told apart by what it
        was before. A space no activation carries is frozen (NO_FEATURES), except `heads`
        and head dims (matched on their products: the groups of a grouped op)."""
        for s in spaces:
            if s.derived is not None or s.frozen:
                continue
            activations = sorted((a for a in s.members if self.is_data(a)),
                                 key=lambda a: order.get(a.node.partition("#")[0], 0))
            if not activations and s.id in heads:
                continue
            if not activations:
                s.frozen_by = Frozen(FrozenBy.NO_FEATURES)
                continue
            for a in ([] if s.reads else [activations[-1]]) + [activations[0]]:
                if a not in s.reads:
                    s.reads.append(a)

    @staticmethod
    def _axes_by_tensor(keep: list[Hashable], groups: dict, ids: dict[Hashable, int]
                        ) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, int]]]:
        """Parameter name -> {dim: space id} and node name -> {dim: space id}."""
        param_axes: dict[str, dict[int, int]] = {}
        node_axes: dict[str, dict[int, int]] = {}
        for r in keep:
            for m in groups[r]:
                if m[0] == "v":
                    continue  # a factor no tensor carries
                table = param_axes if m[0] == "p" else node_axes
                table.setdefault(m[1], {})[m[2]] = ids[r]
        return param_axes, node_axes

    def _head_table(self, spaces: list[Space], ids: dict[Hashable, int], heads: _Heads,
                    node_axes: dict[str, dict[int, int]]
                    ) -> tuple[dict[int, list[tuple[int, int]]], dict[int, int]]:
        """The table's `heads` (heads space -> [(kron space, head-dim space)]) and
        `head_groups` (grouped-query kron space -> the group's width); the heads' matcher
        reads every projection's activations."""
        head_table: dict[int, list[tuple[int, int]]] = {}
        # a head dim read apart from its heads (no heads axis beside it) is one transform for
        # every head: its products are matched as plain products then (a grouped op's shared
        # per-group dim, a weight's axis apart from its groups, stays with them)
        on_nodes = [set(dims.values()) for dims in node_axes.values()]

        layouts = {ids[r]: ids[h] for r, h in heads.layouts.items() if r in ids and h in ids}

        def apart(h: int, d: int) -> bool:
            carriers = {h} | {r for r, of in layouts.items() if of == h}
            return any(d in axes and not axes & carriers for axes in on_nodes)

        head_groups = {}
        for r, (h, d) in heads.heads.items():
            if r in ids and h in ids and d in ids and not spaces[ids[h]].frozen and (
                    spaces[ids[d]].frozen or d in heads.shared or not apart(ids[h], ids[d])):
                head_table.setdefault(ids[h], []).append((ids[r], ids[d]))
                if r in heads.groups:
                    g = heads.groups[r]
                    head_groups[ids[r]] = g[1] if g[0] == "width" else self._widths((g,))[0]
                spaces[ids[r]].reads = [a for a in spaces[ids[r]].members if self.is_data(a)]
        return head_table, head_groups

    def find_heads(self, derived: dict, frozen_roots: dict[Hashable, Frozen],
                   groups: dict) -> _Heads:
        """Attention heads: row-major products heads × head dim. The heads part is the one
        that pairs with two different head-dim parts (queries and keys share one, values and
        the output projection another); a valid transform permutes whole heads and acts within
        each head. A head dim that keeps the identity (frozen by a rule, derived from frozen
        parts as a rotary embedding's, or with a parameter shared by every head) leaves the
        heads free. Grouped-query attention: heads × group × head dim, where the group pairs
        with the heads only, is a projection of those heads (`_Heads.groups`; the group
        keeps its order). Any other product whose heads cannot be told from the graph keeps
        the identity. Returns what was found (`_Heads`), with `frozen_roots` and what the
        heads freeze as a new dict; `frozen_roots` itself is left as it is."""
        group_roots = {self.uf.find(k) for k in self.size if k[0] == "v" and k[2] == "groups"}
        return _HeadFinder(self.uf.find, derived, frozen_roots, groups, group_roots).run()


def _repeats(parts: tuple, pairs: list[tuple] = ()) -> bool:
    """Whether two axis parts of a cat are one space, once the `pairs` are unified."""
    alias: dict[Hashable, Hashable] = {}

    def root(x: Hashable) -> Hashable:
        while x in alias:
            x = alias[x]
        return x

    for p, q in pairs:
        if root(p) != root(q):
            alias[root(p)] = root(q)
    axes = [root(p) for p in parts if not isinstance(p, int)]
    return len(set(axes)) < len(axes)


@dataclass
class _Heads:
    """What `_Builder.find_heads` found, by union-find root."""

    heads: dict[Hashable, tuple[Hashable, Hashable]]  # kron root -> (heads, head dim)
    groups: dict[Hashable, Hashable]  # grouped-query kron root -> its group part
    layouts: dict[Hashable, Hashable]  # a layout heads × group alone -> its heads
    frozen: dict[Hashable, Frozen]  # the frozen roots given, and those the heads freeze
    shared: set[Hashable] = field(default_factory=set)  # per-group dims one transform moves


class _HeadFinder:
    """Tells attention heads among the row-major products (see `_Builder.find_heads`)."""

    def __init__(self, find: Callable[[Hashable], Hashable], derived: dict,
                 frozen_roots: dict[Hashable, Frozen], groups: dict,
                 group_roots: set[Hashable] = frozenset()) -> None:
        self.find = find
        self.derived = derived
        self.groups = groups
        self.group_roots = group_roots  # the groups of grouped ops (convolutions, group norms)
        self.shared: set[Hashable] = set()
        self.rule_frozen = set(frozen_roots)
        self.frozen = dict(frozen_roots)  # a copy: the caller's dict is not changed

    def fixed(self, p: Hashable, seen: frozenset = frozenset()) -> bool:
        """Keeps the identity whatever is merged: frozen by a rule, a width with no axis, or
        derived from such parts only (a rotary embedding's head dim: cat of the frozen
        frequency axis)."""
        if p in self.rule_frozen or p[0] == "width":
            return True
        parts = [self.find(q) for q in self.derived.get(p, (None, ()))[1]
                 if not isinstance(q, int)]
        return p not in seen and bool(parts) and all(self.fixed(q, seen | {p}) for q in parts)

    def flat(self, r: Hashable) -> list[Hashable]:
        """The parts of product `r`, nested products flattened; a width with no axis (k
        copies of each unit) is the part ("width", k, r, position)."""
        find, derived = self.find, self.derived
        return [("width", p, r, i) if isinstance(p, int) else q
                for i, p in enumerate(derived[r][1])
                for q in ([p] if isinstance(p, int) else
                          self.flat(find(p)) if derived.get(find(p), ("",))[0] == "kron"
                          else [find(p)])]

    def products(self) -> dict[Hashable, list[Hashable]]:
        """Kron root -> its flat parts, for the products with a transformable part (more
        than one, or at most three parts in all)."""
        krons = {}
        for r, (kind, parts) in self.derived.items():
            axes = self.flat(r) if kind == "kron" else []
            free = [p for p in axes if not self.fixed(p)]
            if kind == "kron" and free and (len(free) > 1 or len(axes) <= 3):
                krons[r] = axes
        return krons

    @staticmethod
    def partners(krons: dict[Hashable, list[Hashable]]) -> dict[Hashable, set]:
        """Part -> the parts it is multiplied with in products of two."""
        partners: dict[Hashable, set] = {}
        for axes in krons.values():
            if len(axes) == 2:
                partners.setdefault(axes[0], set()).add(axes[1])
                partners.setdefault(axes[1], set()).add(axes[0])
        return partners

    def pairs(self, krons: dict[Hashable, list[Hashable]], partners: dict[Hashable, set]
              ) -> tuple[dict[Hashable, tuple[Hashable, Hashable]], dict[Hashable, list]]:
        """Heads × head dim among the products of one or two transformable parts; the
        others freeze. Returns kron root -> (heads, head dim), and the products of three
        parts, left for `grouped`."""
        out: dict[Hashable, tuple[Hashable, Hashable]] = {}
        three = {}
        for r, axes in krons.items():
            free = [p for p in axes if not self.fixed(p)]
            many = [p for p in axes if len(partners.get(p, ())) > 1]
            if any(p in self.group_roots for p in axes):
                self.group_product(r, axes, out)
                continue
            if len(axes) == 3:
                three[r] = axes
                continue
            if len(free) == 1:
                # a product with one transformable part is a valid plain product; it is heads
                # (with a head dim that keeps the identity) when that part pairs with another,
                # transformable head dim elsewhere
                h = free[0]  # (the fixed part may pair with many: one rotary table for
                # every layer)
                if h in many and h not in self.derived and any(
                        not self.fixed(q) for q in partners[h]):
                    out[r] = (h, axes[1] if axes[0] == h else axes[0])
                continue
            if len(axes) != 2 or len(many) != 1 or any(p in self.derived for p in axes):
                for p in free:
                    self.frozen.setdefault(p, Frozen(FrozenBy.HEADS))
                continue
            h = many[0]
            d = axes[1] if axes[0] == h else axes[0]
            if any(m[0] == "p" for m in self.groups.get(d, ())):
                # a parameter shared by every head (a per-head norm): the head dim keeps the
                # identity, whole heads may still move
                self.frozen.setdefault(d, Frozen(FrozenBy.HEADS, detail=(
                    "a head dim with a parameter shared by every head")))
            out[r] = (h, d)
        return out, three

    def group_product(self, r: Hashable, axes: list[Hashable],
                      out: dict[Hashable, tuple[Hashable, Hashable]]) -> None:
        """A product with the groups of a grouped op (convolution, group norm): groups ×
        per-group units is a pair like heads × head dim (a per-group dim a parameter reads
        is moved by one transform in every group: `shared`); a product of such a pair with
        parts that keep the identity (a flatten) follows it; any other product freezes."""
        direct = [p if isinstance(p, int) else self.find(p) for p in self.derived[r][1]]
        groups = [p for p in direct if p in self.group_roots]
        rest = [p for p in direct if p not in self.group_roots]
        if len(direct) == 2 and len(groups) == 1 and not isinstance(rest[0], int) \
                and rest[0] not in self.derived and rest[0] not in self.group_roots:
            out[r] = (groups[0], rest[0])
            if any(m[0] == "p" for m in self.groups.get(rest[0], ())):
                self.shared.add(rest[0])
            return
        if not groups and len([p for p in direct
                               if not isinstance(p, int) and not self.fixed(p)]) <= 1:
            return  # a grouped product times parts that keep the identity
        for p in axes:
            if not self.fixed(p):
                self.frozen.setdefault(p, Frozen(FrozenBy.HEADS, detail=(
                    "the channels of a grouped op (convolution or group norm) are also split "
                    "or reshaped in a way that does not move whole groups")))

    def grouped(self, out: dict[Hashable, tuple[Hashable, Hashable]],
                three: dict[Hashable, list], partners: dict[Hashable, set]
                ) -> dict[Hashable, Hashable]:
        """Grouped-query attention: queries laid out heads × group × head dim, where the
        group pairs with the heads only (the key/value heads repeated for the group's
        queries). Adds them to `out`; other products of three transformable parts freeze.
        Returns kron root -> its group part."""
        dims_of: dict[Hashable, set] = {}
        for h, d in out.values():
            dims_of.setdefault(h, set()).add(d)
        head_groups = {}
        for r, (h, g, d) in three.items():
            if d in dims_of.get(h, ()) and partners.get(g) == {h} and not self.fixed(h):
                out[r] = (h, d)
                head_groups[r] = g
                if g[0] != "width":
                    self.frozen.setdefault(g, Frozen(FrozenBy.HEADS, detail=(
                        "the query heads that share a key/value head keep their order")))
            elif len([p for p in three[r] if not self.fixed(p)]) > 1:
                for p in three[r]:
                    if not self.fixed(p):
                        self.frozen.setdefault(p, Frozen(FrozenBy.HEADS))
        return head_groups

    def run(self) -> _Heads:
        """Find the heads; the layout heads × group alone (after the keys are repeated) is no
        projection and leaves the heads."""
        krons = self.products()
        partners = self.partners(krons)
        out, three = self.pairs(krons, partners)
        head_groups = self.grouped(out, three, partners)
        grouped = set(head_groups.values())
        layouts = {r: h for r, (h, d) in out.items() if d in grouped}
        for r in layouts:
            del out[r]
        return _Heads(out, head_groups, layouts, self.frozen, self.shared)


def _data_nodes(graph: fx.Graph) -> set[str]:
    """Names of the nodes whose values depend on a graph input (activations)."""
    data: set[str] = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a.name in data for a in n.all_input_nodes):
            data.add(n.name)
    return data


def find_spaces(traced: Traced) -> SpaceTable:
    """Group the axes of a traced model into spaces (see the module docstring and docs/design.md) and
    return the table; `traced` is not changed (`graphmerge.trace` returns both together, as a
    `graphmerge.graph.analyse.Analysed`)."""
    if not isinstance(traced, Traced):
        raise GraphmergeError(f"find_spaces needs a capture (graphmerge.graph.capture.capture, "
                              f"or graphmerge.trace), got {type(traced).__name__}")
    return _Builder(traced).build()

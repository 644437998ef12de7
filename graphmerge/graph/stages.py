"""Units of depth, found from the graph alone (no container, module name or front end assumed).

A **residual unit** is the stretch of graph between two reads of one residual stream:
x ← x + f(x) for any branch f (attention, MLP, inverted residual, squeeze-and-excitation, layer
scale), followed by the ops that map the sum to the next unit's input (a ReLU as in ResNets, a
LayerNorm as in post-norm BERT, an elementwise affine with parameters as MobileBERT's NoNorm). It is found at an add one of whose operands (the skip x) is an
ancestor of the other (the branch), when the branch ends in a layer with weights reached through
ops that keep a zero (so the unit can be made the identity) and nothing between x and the add is
read from outside. Units whose skip is the previous unit's output form a chain; a chain's units
are grouped by the period of their op sequence (attention, MLP, attention, MLP, … → pairs).

A **plain unit** is linear/conv [→ norm, dropout] → activation with equal input and output
shapes; consecutive plain units of one op sequence, each the only reader of the last, chain.

A **concatenation unit** is x ← cat([x, f(x)]) (a dense layer); it widens the stream, so a
deeper chain of them is wider as well: an inserted one appends a piece of zeros to the stream
(`graphmerge.surgery.deepen`).

Shape reads and asserts are no structure (a deeper model reads shapes more often). Tensors
that nothing but such tensors read belong to no unit but to the trunk: a stage may reshape its
input once for an output the model does not return, which in its first unit would break the
period.

A **stage** is a maximal chain. Everything outside stages is the **trunk**; a stage is placed
by the number of trunk nodes before it (its anchor), so two models of one family that differ in
depth have equal trunks, and a stage one model lacks has depth 0 there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from graphmerge.errors import MismatchError
from graphmerge.graph.capture import Traced
from graphmerge.graph.kinds import (
    family,
    is_activation,
    is_norm,
    is_pass,
    keeps_zero,
    kind,
    node_key,
    tensor_args,
)
from graphmerge.graph.rules.registry import is_metadata

__all__ = ["Unit", "Stage", "find_stages", "aligned_stages", "trunk", "corresponding_stages",
           "check_trunks", "is_add", "is_affine", "branch_producer", "readers", "through_identity"]


def _ends_unit(n: fx.Node) -> bool:
    """An activation that ends a unit: one that acts on each value alone (not softmax)."""
    return is_activation(n, pointwise=True)


def _post_op(n: fx.Node) -> bool:
    """An op that may follow a unit's layer or add: an activation, a norm, dropout."""
    return _ends_unit(n) or is_norm(n) or is_pass(n)


def is_affine(n: fx.Node) -> bool:
    """x · w or x + b with parameters w, b (an elementwise affine such as MobileBERT's NoNorm):
    it may follow a residual add like a norm, and is the identity with w = 1, b = 0."""
    return kind(n) in ("mul", "add") and any(a.op == "get_attr" for a in n.all_input_nodes)


@dataclass
class Unit:
    """One unit of depth: the stream value it reads, the value it writes, its nodes in graph
    order (input excluded, output included, parameters not listed) and their op signature.
    A dense layer's output holds its whole input too: `new` names what it adds."""

    input: str
    output: str
    nodes: list[str]
    kind: str                 # "residual" | "layer" | "concat"
    signature: tuple = ()
    new: str = ""

    @property
    def measured(self) -> str:
        """The value that tells units apart (depth alignment compares them): what a dense
        layer adds, else the output."""
        return self.new or self.output


@dataclass
class Stage:
    """A chain of units; `anchor` = (trunk nodes before it, rank among stages placed there)."""

    input: str
    anchor: tuple[int, int]
    units: list[Unit] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.units)

    @property
    def name(self) -> str:
        return f"stage at `{self.input}`"


def is_add(n: fx.Node) -> bool:
    """Whether node n adds two values (`a + b`, `torch.add`, `a += b`, `aten.add`)."""
    return n.op in ("call_function", "call_method") and kind(n) == "add"


def readers(n: fx.Node) -> list[fx.Node]:
    """The nodes that read n's values (not its shape, dtype or a check on them)."""
    return [u for u in n.users if not is_metadata(u)]


def _has_weights(n: fx.Node) -> bool:
    if n.op == "call_module":
        return any(True for _ in n.graph.owning_module.get_submodule(n.target).parameters())
    return n.op == "call_function" and any(
        a.op == "get_attr" for a in n.all_input_nodes) and not keeps_zero(n) and not is_add(n)


def branch_producer(node: fx.Node, inside: set[fx.Node] | None = None) -> fx.Node | None:
    """The layer with weights whose zero output makes `node` zero: `node` itself, or one
    reached back through ops that map zero to zero (a product such as layer scale or squeeze-
    and-excitation, an item of a tuple output, dropout, casts); only nodes in `inside`."""
    if inside is not None and node not in inside:
        return None
    if _has_weights(node):
        return node
    inputs = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
    if not keeps_zero(node) or not inputs:
        return None
    if kind(node) == "mul":  # zero when one factor is: follow the one a layer makes
        return next((p for p in (branch_producer(a, inside) for a in inputs) if p), None)
    return branch_producer(inputs[0], inside)


class _Graph:
    """The nodes that compute (no get_attr), their order and shapes."""

    def __init__(self, traced: Traced) -> None:
        self.nodes = [n for n in traced.graph.nodes if n.op != "get_attr"]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.shapes = traced.shapes

    def shape(self, n: fx.Node) -> tuple | None:
        s = self.shapes.get(n.name)
        return s if isinstance(s, tuple) and all(isinstance(d, int) for d in s) else None

    def reaches(self, src: fx.Node, dst: fx.Node) -> bool:
        """Whether `dst` is an ancestor of `src`."""
        lo, seen, todo = self.order[dst], set(), [src]
        while todo:
            n = todo.pop()
            if n is dst:
                return True
            if n in seen or n not in self.order or self.order[n] < lo:
                continue
            seen.add(n)
            todo.extend(n.all_input_nodes)
        return False

    def window(self, start: fx.Node, end: fx.Node) -> list[fx.Node]:
        return self.nodes[self.order[start] + 1:self.order[end] + 1]

    def _stream(self, start: fx.Node, window: list[fx.Node]) -> set[fx.Node]:
        """The window's nodes computed from `start` (the rest computes masks, sizes, …)."""
        found = {start}
        for n in window:  # reading a dtype or a size of the stream is not computing from it
            if not is_metadata(n) and any(a in found for a in n.all_input_nodes):
                found.add(n)
        found.discard(start)
        return found

    def closed(self, start: fx.Node, end: fx.Node) -> bool:
        """Nothing computed from `start` before `end` is read after `end`."""
        window = self.window(start, end)
        inside = set(window)
        return all(u in inside for n in self._stream(start, window) if n is not end
                   for u in n.users)

    def members(self, start: fx.Node, end: fx.Node, shared: bool = False) -> list[fx.Node]:
        """The nodes of the unit from `start` (excluded) to `end`: what is computed from the
        stream, and what only the unit reads (a causal mask sliced inside the block). A value
        read later too (an attention mask or a batch size computed once for every block) is
        the trunk's. With `shared`, so is what only the unit reads but computes from a value
        of the trunk (the attention mask of a model with one block: one computed once for
        every block in a deeper model of its family), and what only such values read."""
        window = self.window(start, end)
        stream = self._stream(start, window)
        outside: set[fx.Node] = set()
        if shared:
            inside = set(window)
            for n in window:
                if n not in stream and any(a in outside or (a not in inside and a is not start)
                                           for a in n.all_input_nodes if a.op != "get_attr"):
                    outside.add(n)
            for n in reversed(window):
                if n not in stream and readers(n) and all(u in outside for u in readers(n)):
                    outside.add(n)
        members: set[fx.Node] = set()
        dead = self._dead(window)
        for n in reversed(window):
            if (n in outside or n in dead) and n is not end:
                continue
            if n is end or n in stream or (
                    readers(n) and all(u in members for u in readers(n))) or (
                    not n.users and any(a in stream for a in n.all_input_nodes)):  # a check
                members.add(n)
        return [n for n in window if n in members]

    def _dead(self, window: list[fx.Node]) -> set[fx.Node]:
        """The tensors of `window` that nothing but such tensors read (a hidden state a model
        reshapes for an output it does not return): no unit's structure — a model computes
        them once per stage, not once per unit."""
        dead: set[fx.Node] = set()
        for n in reversed(window):
            if self.shape(n) is not None and all(u in dead for u in n.users):
                dead.add(n)
        return dead

    def post_ops(self, n: fx.Node) -> list[fx.Node]:
        """The single-reader chain of activations, norms, elementwise affines and dropout after
        `n`."""
        out = []
        while len(readers(n)) == 1:
            u = readers(n)[0]
            inputs = [a for a in u.all_input_nodes if a.op != "get_attr"]
            if inputs != [n] or not (_post_op(u) or is_affine(u)) or \
                    self.shape(u) != self.shape(n):
                break
            out.append(u)
            n = u
        return out


def _signature(nodes: Iterable[fx.Node]) -> tuple:
    return tuple(node_key(n) for n in nodes)


def _residual_units(g: _Graph, shared: bool) -> list[list[Unit]]:
    """Chains of residual units, each a list of units (one per add); `shared` as in
    `_Graph.members`."""
    found = []  # (skip, add, post ops)
    for n in g.nodes:
        operands = [a for a in n.args if isinstance(a, fx.Node)]
        if not is_add(n) or len(operands) != 2 or any(a.op == "get_attr" for a in operands):
            continue
        if g.shape(n) is None or any(g.shape(a) != g.shape(n) for a in operands):
            continue
        skip, branch = _skip_and_branch(g, *operands)
        if skip is None or not g.closed(skip, n):
            continue
        if branch_producer(branch, set(g.window(skip, n))) is None:
            continue
        found.append((skip, n, g.post_ops(n)))
    # a unit nested in another's branch is part of that unit
    found = [f for f in found if not any(
        o is not f and g.order[o[0]] <= g.order[f[0]] and g.order[f[1]] < g.order[o[1]]
        for o in found)]
    chains: list[list[list]] = []
    for skip, add, post in found:
        head = next((c for c in chains if _follows(c[-1], skip)), None)
        item = [skip, add, post]
        if head is not None:
            prev = head[-1]
            prev[2] = prev[2][:[prev[1], *prev[2]].index(skip)]  # its output is this skip
            head.append(item)
        else:
            chains.append([item])
    out = []
    for chain in chains:
        _trim_last(g, chain, shared)
        units = []
        for skip, add, post in chain:
            nodes = g.members(skip, post[-1] if post else add, shared)
            units.append(Unit(skip.name, nodes[-1].name, [m.name for m in nodes], "residual",
                              _signature(nodes)))
        out.append(units)
    return out


def _skip_and_branch(g: _Graph, a: fx.Node, b: fx.Node) -> tuple:
    """(the stream value the skip carries, the branch) of an add, or (None, None): the skip
    is an ancestor of the branch, itself or through a shortcut nn.Identity()."""
    for skip, branch in ((a, b), (b, a)):
        for value in (skip, through_identity(skip)):
            if g.reaches(branch, value):
                return value, branch
    return None, None


def through_identity(n: fx.Node) -> fx.Node:
    """The value `n` passes on unchanged (through dropout, nn.Identity, casts)."""
    while is_pass(n) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _follows(item: list, skip: fx.Node) -> bool:
    _, add, post = item
    return skip is add or skip in post


def _trim_last(g: _Graph, chain: list[list], shared: bool) -> None:
    """The last unit of a chain has no next skip to end at: it keeps the post ops its chain's
    other units have (the previous one of its op sequence, else the one before it); a lone unit
    keeps only activations (a final norm belongs to the trunk)."""
    skip, add, post = chain[-1]
    body = _signature(g.members(skip, add, shared))
    like = [c for c in chain[:-1] if _signature(g.members(c[0], c[1], shared)) == body] \
        or chain[:-1]
    if like:
        n = len(like[-1][2])
        keep = [kind(p) for p in like[-1][2]]
        chain[-1][2] = post[:n] if [kind(p) for p in post[:n]] == keep else []
    else:
        k = 0
        while k < len(post) and _ends_unit(post[k]):
            k += 1
        chain[-1][2] = post[:k]


def _concat_units(g: _Graph, shared: bool, taken: set[str]) -> list[list[Unit]]:
    """Chains of concatenation units x ← cat([x, f(x)]) (a dense layer): f ends in a layer with
    weights, keeps x's shape but along the concatenated axis (no pooling, no upsampling: a
    U-Net level is no unit) and nothing it computes from x is read outside. Every unit widens
    the stream, so a deeper chain is wider too."""
    chains: list[list[Unit]] = []
    for n in g.nodes:
        parts = n.args[0] if kind(n) == "cat" and n.args else None
        if n.name in taken or not isinstance(parts, (list, tuple)) or len(parts) != 2 \
                or not all(isinstance(a, fx.Node) for a in parts) or g.shape(n) is None:
            continue
        skip, branch = _skip_and_branch(g, *parts)
        if skip is None or skip is not parts[0] or not g.closed(skip, n) or \
                branch_producer(branch, set(g.window(skip, n))) is None:
            continue
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        shape = g.shape(skip)
        if shape is None or not isinstance(dim, int):
            continue
        dim %= len(shape)
        if any(s is None or len(s) != len(shape) or any(
                a != b for k, (a, b) in enumerate(zip(s, shape)) if k != dim)
               for s in (g.shape(m) for m in g._stream(skip, g.window(skip, n)))):
            continue
        nodes = g.members(skip, n, shared)
        unit = Unit(skip.name, n.name, [m.name for m in nodes], "concat", _signature(nodes),
                    branch.name)
        chain = next((c for c in chains if c[-1].output == skip.name), None)
        if chain is not None:
            chain.append(unit)
        else:
            chains.append([unit])
    return chains


def _plain_units(g: _Graph, taken: set[str]) -> list[list[Unit]]:
    """Chains of layer units (linear/conv [→ norm/dropout] → activation, shape kept)."""
    units = []
    for v in g.nodes:
        if g.shape(v) is None:
            continue
        for first in v.users:
            if first.name in taken or family(first) != "linear" or not first.args \
                    or first.args[0] is not v or not (first.op == "call_module"
                                                      or "weight" in tensor_args(first)):
                continue
            body = [first]
            while not _ends_unit(body[-1]) and len(body[-1].users) == 1:
                nxt = next(iter(body[-1].users))
                if not _post_op(nxt) or nxt.name in taken:
                    break
                body.append(nxt)
            if not _ends_unit(body[-1]) or g.shape(body[-1]) != g.shape(v):
                continue
            units.append(Unit(v.name, body[-1].name, [n.name for n in body], "layer",
                              _signature(body)))
    by_input = {u.input: u for u in units}
    users = {n.name: len(n.users) for n in g.nodes}
    starts = [u for u in units if not any(p.output == u.input and p.signature == u.signature
                                          and users[u.input] == 1 for p in units)]
    chains = []
    for u in starts:
        chain = [u]
        while (nxt := by_input.get(chain[-1].output)) is not None and \
                nxt.signature == u.signature and users[chain[-1].output] == 1:
            chain.append(nxt)
        chains.append(chain)
    return chains


def _period(units: Sequence[Unit]) -> int:
    sigs = [u.signature for u in units]
    return next(p for p in range(1, len(sigs) + 1)
                if len(sigs) % p == 0 and all(s == sigs[k % p] for k, s in enumerate(sigs)))


def _group(chain: Sequence[Unit]) -> list[Unit]:
    p = _period(chain)
    return [Unit(chain[k].input, chain[k + p - 1].output,
                 [n for u in chain[k:k + p] for n in u.nodes], chain[k].kind,
                 tuple(s for u in chain[k:k + p] for s in u.signature), chain[k + p - 1].new)
            for k in range(0, len(chain), p)]


def find_stages(traced: Traced, plain: bool = True, shared: bool = False) -> list[Stage]:
    """The stages of a traced model in graph order (see the module docstring); residual ones
    only if not `plain`; with `shared`, what a unit alone reads but computes from the trunk's
    values is the trunk's (see `_Graph.members`)."""
    g = _Graph(traced)
    residual = _residual_units(g, shared)
    taken = {n for chain in residual for u in chain for n in u.nodes}
    dense = _concat_units(g, shared, taken)
    taken |= {n for chain in dense for u in chain for n in u.nodes}
    chains = residual + dense + (_plain_units(g, taken) if plain else [])
    chains.sort(key=lambda c: g.order[traced.node(c[0].input)])
    inside = {n for chain in chains for u in chain for n in u.nodes}
    stages: list[Stage] = []
    for chain in chains:
        first = traced.node(chain[0].nodes[0])
        before = sum(1 for n in g.nodes[:g.order[first]] if n.name not in inside)
        rank = sum(1 for s in stages if s.anchor[0] == before)
        stages.append(Stage(chain[0].input, (before, rank), _group(chain)))
    return stages


def trunk(traced: Traced, stages: Sequence[Stage]) -> list[fx.Node]:
    """The nodes outside every stage that compute tensors, in graph order: parameters, shape
    reads, sizes and asserts (values that are not tensors) are no structure — a deeper model
    reads shapes more often, and two traces of one family place such reads differently."""
    inside = {n for s in stages for u in s.units for n in u.nodes}
    return [n for n in traced.graph.nodes if n.op != "get_attr" and n.name not in inside
            and (n.op in ("placeholder", "output") or traced.shapes.get(n.name) is not None)]


def corresponding_stages(ref: Traced, ref_stages: Sequence[Stage], other: Traced,
                         other_stages: Sequence[Stage]) -> dict[int, Stage | None]:
    """For each stage of `ref` (by index), the stage of `other` at the same place (None: it has
    none there, depth 0). The two trunks must agree op by op.

    Raises:
        MismatchError: naming the first trunk node where the models differ, or a stage of
            `other` that `ref` has no stage for.
    """
    check_trunks(ref, ref_stages, other, other_stages)
    at = {s.anchor: s for s in other_stages}
    extra = set(at) - {s.anchor for s in ref_stages}
    if extra:
        s = at[min(extra)]
        raise MismatchError(f"the model has a {s.name} that the reference has no stage for")
    return {i: at.get(s.anchor) for i, s in enumerate(ref_stages)}


def check_trunks(ref: Traced, ref_stages: Sequence[Stage], other: Traced,
                 other_stages: Sequence[Stage]) -> None:
    """Raises MismatchError naming the first trunk node where two models differ."""
    ta, tb = trunk(ref, ref_stages), trunk(other, other_stages)
    for k, (a, b) in enumerate(zip(ta, tb)):
        if node_key(a) != node_key(b):
            raise MismatchError(
                f"outside their units of depth the models differ at node {k}: `{b.name}` "
                f"({kind(b)}) where the reference has `{a.name}` ({kind(a)}); "
                f"{_why(ref, a, 'the reference') or _why(other, b, 'the model') or ''}depth "
                f"alignment needs models of one family whose stages differ only in their "
                f"number of units")
    if len(ta) != len(tb):
        raise MismatchError(f"outside their units of depth the models have {len(tb)} and "
                            f"{len(ta)} nodes; they are not of one family")



def _why(traced: Traced, n: fx.Node, who: str) -> str | None:
    """Why a trunk node no counterpart matches is structure, when it changes the shape of the
    stream (a pool, a strided or widening layer: a stage or level one model lacks)."""
    if family(n) == "reshape":
        return None
    x = next((a for a in n.all_input_nodes if a.op != "get_attr"), None)
    before, after = (traced.shapes.get(m.name) if m is not None else None for m in (x, n))
    if not isinstance(before, tuple) or not isinstance(after, tuple) or before == after:
        return None
    return (f"{who} has a stage there that changes the stream's shape ({list(before)} → "
            f"{list(after)}), so their stage structure differs; ")


def aligned_stages(traced: Sequence[Traced], check: Callable[[list[list[Stage]], int], None]
                   ) -> tuple[list[list[Stage]], int, dict[str, bool]]:
    """The stages of every model, the reference (the model with the most units) and the
    keyword arguments of `find_stages` that found them, such that `check(stages, reference)`
    passes. Tried in turn: with plain units, then without them (a layer that keeps its width by
    coincidence is a plain unit in one model and trunk in another); then each again with
    values computed from the trunk kept out of units (an attention mask computed once is read
    by the only block of a one-block model, by every block of a deeper one).

    Raises:
        MismatchError: the first failure of `check`, when all fail.
    """
    first: MismatchError | None = None
    for shared in (False, True):
        for plain in (True, False):
            mode = {"plain": plain, "shared": shared}
            stages = [find_stages(t, **mode) for t in traced]
            ref = max(range(len(traced)), key=lambda i: sum(s.depth for s in stages[i]))
            try:
                check(stages, ref)
                return stages, ref, mode
            except MismatchError as e:
                first = first or e
    assert first is not None
    raise first

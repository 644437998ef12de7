"""Which spaces admit an orthogonal transform, decided from the graph alone.

A free base space is *rotatable* when every op touching it is equivariant under an orthogonal
map of its axis (`graph.rules.orthogonal`): then x → xQ on every axis of the space, with the
parameters that touch it rewritten, computes the same function, for any orthogonal Q — or for
any Q with Q·1 = 1 when a LayerNorm normalises over it, a mean is taken over it or a constant
is added along it. A norm over the space must have its affine folded into the ops reading it,
so every reader of its output must be a linear over the axis (a post-norm residual, where the
norm's output is itself added to the stream, cannot be folded). A space that is part of a
concatenation or product of spaces, or a head or head dim, is not considered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from graphmerge.graph.capture import Traced
from graphmerge.graph.kinds import kind, tensor_args
from graphmerge.graph.rules.orthogonal import Site, verdict
from graphmerge.graph.rules.registry import is_metadata
from graphmerge.graph.spaces import SpaceTable

__all__ = ["Rotatable", "rotatable_spaces", "space_sites", "fold_readers"]


@dataclass(frozen=True)
class Rotatable:
    """One space's answer: `ok`; `ones` (Q must keep the all-ones direction); `norms` (nodes of
    the norms over it, whose affine is folded first); `params` (the norms' weight and bias
    names; once folded, those that became the identity, which a rotation leaves alone);
    `reason` (why not)."""

    space: int
    ok: bool
    ones: bool = False
    norms: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class _Walk:
    traced: Traced
    table: SpaceTable
    sid: int
    sites: list[Site] = field(default_factory=list)

    def dims(self, n: Any) -> tuple[int, ...]:
        if not isinstance(n, fx.Node):
            return ()
        return tuple(sorted(d for d, s in self.table.node_axes.get(n.name, {}).items()
                            if s == self.sid))

    def ndims(self, n: Any) -> int:
        s = self.traced.shapes.get(n.name) if isinstance(n, fx.Node) else None
        return len(s) if isinstance(s, tuple) and all(isinstance(d, int) for d in s) else 0


def space_sites(traced: Traced, table: SpaceTable, sid: int) -> list[Site]:
    """Every op with an input, output or own parameter axis in space `sid`."""
    w = _Walk(traced, table, sid)
    root = traced.graph_module
    for n in traced.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr") or is_metadata(n):
            continue
        module = root.get_submodule(n.target) if n.op == "call_module" else None
        params = {}
        if module is not None:
            for role, name in tensor_args(n).items():
                dims = [d for d, s in table.param_axes.get(name, {}).items() if s == sid]
                if dims:
                    params[role] = tuple(dims)
        ins = [(a, w.dims(a)) for a in n.all_input_nodes]
        out = w.dims(n)
        if out or params or any(d for _, d in ins):
            w.sites.append(Site(n, kind(n), module, out, ins, w.ndims, params))
    return w.sites


def _derived_parts(table: SpaceTable) -> set[int]:
    return {p for s in table if s.derived is not None for p in s.derived.parts
            if p is not None}


#: ops a norm's output may pass through on its way to the linears its affine is folded into
_THROUGH = ("getitem", "slice", "select", "dropout", "identity", "expand", "unsqueeze",
            "squeeze")


def fold_readers(norm: fx.Node) -> tuple[list[fx.Node], str]:
    """The linears that read norm `norm`'s output (through indexing and dropout), and '' —
    or [] and why its affine cannot be folded into its readers."""
    readers, todo = [], [norm]
    while todo:
        n = todo.pop()
        for user in n.users:
            if is_metadata(user):
                continue
            if kind(user) in _THROUGH and user.args and user.args[0] is n:
                todo.append(user)
            elif kind(user) == "linear" and user.args[0] is n:
                readers.append(user)
            else:
                return [], (f"the affine of norm `{norm.name}` cannot be folded: its output is "
                            f"read by `{user.name}` ({kind(user)}), not only by linears")
    return readers, ""


def rotatable_spaces(traced: Traced, table: SpaceTable, candidates: list[int]
                     ) -> dict[int, Rotatable]:
    """Per candidate space (free base spaces: `match.selection.mergeable`), whether and how
    it can be rotated; a refusal names the first op that breaks it."""
    parts = _derived_parts(table)
    grouped = {s for h, ks in table.heads.items() for s in (h, *(d for _, d in ks))}
    out = {}
    for sid in candidates:
        if sid in parts or sid in grouped or table[sid].derived is not None:
            out[sid] = Rotatable(sid, False, reason="part of a concatenation, a product of "
                                                    "axes or attention heads")
            continue
        out[sid] = _decide(traced, table, sid)
    return out


def _decide(traced: Traced, table: SpaceTable, sid: int) -> Rotatable:
    ones, norms, params = False, [], []
    for site in space_sites(traced, table, sid):
        v = verdict(site)
        if not v.ok:
            return Rotatable(sid, False, reason=f"{v.reason} (`{site.node.name}`)")
        ones |= v.ones
        affine = [name for role, name in tensor_args(site.node).items()
                  if role in ("weight", "bias")] if v.fold else []
        if affine:
            _, why = fold_readers(site.node)
            if why:
                return Rotatable(sid, False, reason=why)
            norms.append(site.node.name)
            params += affine
        elif not v.fold and site.params and site.kind not in ("linear", "conv", "embedding", "Embedding"):
            return Rotatable(sid, False, reason=f"{site.kind} holds a per-unit parameter "
                                                f"(`{site.node.name}`)")
    return Rotatable(sid, True, ones, tuple(norms), tuple(params))

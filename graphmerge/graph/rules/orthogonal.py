"""Orthogonal rules: whether an op still computes the same function when one space's axis is
moved by an orthogonal map Q instead of a permutation.

The axis rules (`registry.py`) say which axes share one transform; every op they link is
equivariant under a *permutation* of the shared axis. Fewer ops are equivariant under any
orthogonal Q (x → xQ on every axis of the space, parameters rewritten to match): linear maps
are (a weight's row or column, a bias, an additive parameter, an embedding table, a product
of two tensors contracted over the axis), elementwise functions of each unit are not. A rule
here reads one `Site` (an op and which of its axes lie in the space) and returns a `Verdict`:
equivariant, equivariant only when Q keeps the all-ones direction (Q·1 = 1: a LayerNorm, a
mean over the axis, a constant added along it), equivariant once a norm's affine is folded
into its readers, or not, with the reason. Rules are keyed by op kind (`graph.kinds.kind`);
an op without one refuses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from graphmerge.graph.kinds import family, target_name

__all__ = ["Site", "Verdict", "ORTHOGONAL", "orthogonal_rule", "verdict"]


@dataclass
class Site:
    """One op touching the space: its node, kind, module (None for a call), the dims of its
    output in the space, and per tensor argument (in argument order) the dims in the space.
    `ndims` gives a node's number of dimensions (0: not a tensor)."""

    node: fx.Node
    kind: str
    module: nn.Module | None
    out: tuple[int, ...]
    ins: list[tuple[Any, tuple[int, ...]]]
    ndims: Callable[[Any], int]
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # module's own tensors

    def dims(self, i: int) -> tuple[int, ...]:
        """The dims in the space of argument i (positional), () if none or not a node."""
        if i >= len(self.node.args) or not isinstance(self.node.args[i], fx.Node):
            return ()
        a = self.node.args[i]
        return next((d for n, d in self.ins if n is a), ())

    @property
    def carrying(self) -> list[tuple[Any, tuple[int, ...]]]:
        """The tensor arguments with an axis in the space."""
        return [(n, d) for n, d in self.ins if d]


@dataclass(frozen=True)
class Verdict:
    """ok: the op is equivariant; ones: only for Q with Q·1 = 1; fold: its affine (a norm's
    weight and bias) must first be folded into its readers; reason: why not (ok False)."""

    ok: bool
    ones: bool = False
    fold: bool = False
    reason: str = ""


OK = Verdict(True)
ONES = Verdict(True, ones=True)
RuleFn = Callable[[Site], Verdict]
ORTHOGONAL: dict[str, RuleFn] = {}


def orthogonal_rule(*kinds: str) -> Callable[[RuleFn], RuleFn]:
    """Register a rule for op kinds (`graph.kinds.kind` names); registering twice is an error."""

    def deco(fn: RuleFn) -> RuleFn:
        for k in kinds:
            if k in ORTHOGONAL:
                raise RuntimeError(f"an orthogonal rule for {k!r} is already registered")
            ORTHOGONAL[k] = fn
        return fn
    return deco


def _no(reason: str) -> Verdict:
    return Verdict(False, reason=reason)


def verdict(site: Site) -> Verdict:
    """The rule's verdict on `site` (an op kind without a rule refuses, naming it)."""
    rule = ORTHOGONAL.get(site.kind)
    if rule is None:
        if family(site.kind) == "activation" and site.kind != "softmax":
            return _no(f"an elementwise nonlinearity ({site.kind}) acts on each unit")
        return _no(f"no orthogonal rule for op {site.kind!r}")
    return rule(site)


@orthogonal_rule("dropout", "identity", "type_as")
def _pass(site: Site) -> Verdict:
    return OK


@orthogonal_rule("reshape", "flatten", "getitem", "slice", "select", "expand", "unsqueeze",
                 "squeeze", "roll", "repeat", "getattr")
def _whole(site: Site) -> Verdict:
    """Moves values without mixing units: the axis must stay whole (one axis in, one out)."""
    counts = {len(d) for _, d in site.carrying}
    if counts != {len(site.out)}:
        return _no(f"{site.kind} cuts, splits or widens the axis")
    return OK


@orthogonal_rule("cat", "stack")
def _cat(site: Site) -> Verdict:
    """A concatenation along another axis, of tensors that all carry the axis."""
    tensors = [(n, d) for n, d in site.ins if site.ndims(n)]
    if not site.out or any(len(d) != len(site.out) for _, d in tensors):
        return _no(f"{site.kind} joins the axis with others, or a tensor without it")
    return OK


@orthogonal_rule("add", "sub")
def _add(site: Site) -> Verdict:
    """A sum of tensors on the axis is linear; a constant or a tensor broadcast along the axis
    (a per-position scalar) is added to every unit alike: only Q·1 = 1 keeps it."""
    if any(len(d) != len(site.out) for _, d in site.carrying):
        return _no(f"{site.kind} of tensors that carry the axis differently")
    others = [a for a in site.node.args if not (isinstance(a, fx.Node) and
                                                 dict(site.ins).get(a))]
    constant = any(isinstance(a, (int, float)) and a != 0 or isinstance(a, fx.Node)
                   and site.ndims(a) for a in others)
    return ONES if constant else OK


@orthogonal_rule("mul", "truediv", "div")
def _mul(site: Site) -> Verdict:
    """A product with a per-position or scalar factor is linear; a product of two tensors on
    the axis (a gate, a per-unit scale) is not."""
    carrying = site.carrying
    if len(carrying) != 1:
        what = ("a per-unit parameter (a layer scale)" if any(
            isinstance(n, fx.Node) and n.op == "get_attr" for n, _ in carrying)
            else "two tensors on the axis")
        return _no(f"{site.kind} multiplies {what} elementwise")
    if site.kind != "mul" and carrying[0][0] is not site.node.args[0]:
        return _no(f"{site.kind} divides by the axis")
    return OK


@orthogonal_rule("linear")
def _linear(site: Site) -> Verdict:
    """Weight rows and columns, bias: the axis is the input's or output's last dim."""
    x = site.dims(0) if site.module is None else next((d for _, d in site.ins), ())
    if any(d != site.ndims(site.node.args[0]) - 1 for d in x):
        return _no("a linear reads the axis as a batch dim")
    return OK


@orthogonal_rule("conv")
def _conv(site: Site) -> Verdict:
    at = 8 if target_name(site.node) == "convolution" else 6  # aten.convolution: 8
    groups = (getattr(site.module, "groups", 1) if site.module is not None
              else site.node.args[at] if len(site.node.args) > at else
              site.node.kwargs.get("groups", 1))
    if groups != 1:
        return _no("a grouped convolution acts on groups of units")
    x = next((d for n, d in site.ins if n is site.node.args[0]), ())
    return OK if set(x) <= {1} and set(site.out) <= {1} else _no("a conv reads the axis "
                                                                  "spatially")


@orthogonal_rule("embedding", "Embedding")
def _embedding(site: Site) -> Verdict:
    """The table's feature axis (rotated) is the output's last dim."""
    return OK if set(site.out) <= {site.ndims(site.node) - 1} else _no("embedding indexes "
                                                                        "the axis")


def _contracts(site: Site, a: Any, b: Any, out_free: int) -> Verdict:
    """a @ b: a's last dim and b's second-to-last are contracted; each must carry the axis
    iff the other does, and the free dims on the axis must come out on the axis."""
    da, db = dict(site.ins).get(a, ()), dict(site.ins).get(b, ())
    na, nb = site.ndims(a), site.ndims(b)
    if na < 2 or nb < 2:
        return _no(f"{site.kind} of a vector")
    ca, cb = na - 1 in da, nb - 2 in db
    if ca != cb:
        return _no(f"{site.kind} contracts the axis with an axis not in the space")
    free = len(da) - ca + len(db) - cb
    return OK if free == out_free else _no(f"{site.kind} moves the axis")


@orthogonal_rule("matmul", "mm", "bmm")
def _matmul(site: Site) -> Verdict:
    return _contracts(site, site.node.args[0], site.node.args[1], len(site.out))


@orthogonal_rule("addmm")
def _addmm(site: Site) -> Verdict:
    return _contracts(site, site.node.args[1], site.node.args[2], len(site.out))


@orthogonal_rule("attention")
def _attention(site: Site) -> Verdict:
    """softmax(q kᵀ) v: q and k contracted over their last dim; v's last dim is the output's."""
    q, k, v = (site.dims(i) for i in range(3))
    last = [site.ndims(site.node.args[i]) - 1 for i in range(3)]
    nd = site.ndims(site.node) - 1
    if not (set(q) <= {last[0]} and set(k) <= {last[1]} and set(v) <= {last[2]}
            and set(site.out) <= {nd}):
        return _no("attention reads the axis as tokens or heads")
    if bool(q) != bool(k) or bool(v) != bool(site.out) or site.dims(3):
        return _no("attention contracts the axis with one not in the space")
    return OK


@orthogonal_rule("batch_norm", "group_norm", "GroupNorm", "instance_norm")
def _unit_norm(site: Site) -> Verdict:
    return _no(f"{site.kind} normalises each unit (or group) with its own statistics")


def _norm_axis(site: Site) -> Verdict | None:
    """None when the norm normalises over exactly the axis (its last dim); else the refusal."""
    x = next((d for n, d in site.ins if n is site.node.args[0]), ())
    shape = (getattr(site.module, "normalized_shape", None) if site.module is not None
             else site.node.args[1] if len(site.node.args) > 1 else None)
    n = 1 if shape is None else len(shape) if isinstance(shape, (tuple, list)) else 1
    last = site.ndims(site.node.args[0]) - 1
    if n != 1 or tuple(x) != (last,):
        return _no(f"{site.kind} normalises over more than the axis, or each unit apart")
    return None


@orthogonal_rule("layer_norm")
def _layer_norm(site: Site) -> Verdict:
    """LN(xQ) = LN(x)Q when Q·1 = 1 (the mean is the ones direction, the norm is kept), once
    the affine is folded into the readers."""
    return _norm_axis(site) or Verdict(True, ones=True, fold=True)


@orthogonal_rule("rms_norm")
def _rms_norm(site: Site) -> Verdict:
    """RMS(xQ) = RMS(x)Q for any orthogonal Q, once the affine is folded."""
    return _norm_axis(site) or Verdict(True, fold=True)


@orthogonal_rule("avg_pool", "sum")
def _reduce(site: Site) -> Verdict:
    """Pooling over other axes is linear; a mean or sum over the axis is its ones direction."""
    if target_name(site.node) not in ("mean", "sum"):
        return OK if set(site.out) == set(next((d for _, d in site.carrying), ())) else \
            _no(f"{site.kind} pools over the axis")
    dim = site.node.args[1] if len(site.node.args) > 1 else site.node.kwargs.get("dim")
    x = next((d for _, d in site.carrying), ())
    nd = site.ndims(site.node.args[0])
    reduced = set(range(nd)) if dim is None else {
        d % nd for d in ([dim] if isinstance(dim, int) else dim)}
    return ONES if reduced & set(x) else OK

"""Pair the traced graphs of several models node by node and space by space: after depth
alignment every model must have model 0's topology (widths may differ)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.fx as fx

from graphmerge.errors import MismatchError
from graphmerge.graph.capture import Traced
from graphmerge.graph.spaces import FrozenBy
from graphmerge.graph.tensors import canonical_names, named_tensors

__all__ = ["pair_models", "op_key", "unaligned_owners"]


def op_key(n: fx.Node, gm: fx.GraphModule) -> tuple[str, str]:
    if n.op == "call_module":
        return n.op, type(gm.get_submodule(n.target)).__name__
    t = n.target
    return n.op, t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def pair_models(traced: Sequence[Traced]) -> None:
    """Check that every model has the topology of model 0: same nodes (name, op) in the same
    order and the same space structure. Widths may differ.

    Raises:
        MismatchError: naming the first node or space that differs.
    """
    ref = traced[0]
    ref_nodes = list(ref.graph.nodes)
    for i, t in enumerate(traced[1:], start=1):
        nodes = list(t.graph.nodes)
        for k, (a, b) in enumerate(zip(ref_nodes, nodes)):
            ka, kb = op_key(a, ref.graph_module), op_key(b, t.graph_module)
            if (a.name, ka) != (b.name, kb):
                raise MismatchError(
                    f"model {i} does not match model 0 at graph node {k}: `{b.name}` "
                    f"({kb[0]} {kb[1]}) where model 0 has `{a.name}` ({ka[0]} {ka[1]}). "
                    f"Models must be of one family; different depths need depth alignment.")
        if len(nodes) != len(ref_nodes):
            raise MismatchError(
                f"model {i} has {len(nodes)} graph nodes, model 0 has {len(ref_nodes)}; the first "
                f"{min(len(nodes), len(ref_nodes))} agree. Models must be of one family.")
        for n in ref_nodes:
            if n.op == "placeholder" and ref.shapes.get(n.name) and t.shapes.get(n.name):
                if ref.shapes[n.name][1:] != t.shapes[n.name][1:]:
                    raise MismatchError(
                        f"model {i} takes input `{n.name}` of shape {t.shapes[n.name]}, model 0 "
                        f"{ref.shapes[n.name]} (per sample they must agree)")
        ta, tb = ref.space_table, t.space_table
        if len(ta) != len(tb):
            raise MismatchError(f"model {i} has {len(tb)} spaces, model 0 has {len(ta)}: "
                                f"{_first_grouping_difference(ta, tb, i)}")
        for sa, sb in zip(ta, tb):
            pa = sorted((p.param, p.dim) for p in sa.params)
            pb = sorted((p.param, p.dim) for p in sb.params)
            if pa != pb or sa.frozen != sb.frozen or (sa.derived is None) != (sb.derived is None):
                raise MismatchError(
                    f"space {sa.id} differs between model 0 and model {i}: parameters "
                    f"{pa[:3]}… vs {pb[:3]}…")
            # (an output's width may differ: per-task heads are attached by attach_heads)
            if sa.frozen and sa.width != sb.width and sa.frozen_by.by != FrozenBy.GRAPH_OUTPUT:
                if any(sa.id == d for ks in ta.heads.values() for _, d in ks):
                    raise MismatchError(
                        f"space {sa.id} is a head dim that keeps its order ({sa.why}) and its "
                        f"width differs between model 0 ({sa.width}) and model {i} "
                        f"({sb.width}): its units cannot be paired across widths (a rotary "
                        f"position encoding's frequencies, for one, depend on the head dim's "
                        f"width), so heads of different widths are refused here (a wider FFN or "
                        f"more heads of the same dim still merge)")
                raise MismatchError(
                    f"space {sa.id} keeps the identity ({sa.why}) but its width differs between "
                    f"model 0 ({sa.width}) and model {i} ({sb.width}); models must agree on it")
        _check_unaligned_sizes(ref, t, i)


def _first_grouping_difference(ta, tb, i: int) -> str:
    """Where two space tables of one graph first group the parameters' axes differently
    (which tensor axis joins other axes in one model and not in the other)."""
    def axes_of(table) -> dict[tuple[str, int], frozenset]:
        by = {}
        for s in table:
            keys = frozenset((a.param, a.dim) for a in s.params)
            by.update({k: keys for k in keys})
        return by

    a, b = axes_of(ta), axes_of(tb)
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            mine, other = (len(x.get(key, ())) for x in (a, b))
            return (f"`{key[0]}` axis {key[1]} shares its space with {mine - 1} other "
                    f"parameter axes in model 0 and with {max(other - 1, 0)} in model {i}"
                    f"{'' if key in b else ' (in no space there)'}: the models differ in "
                    f"structure there, and models must agree on how their axes are tied")
    return "the parameters' axes are grouped alike, the activations' are not"


def _unaligned_sizes(ref: Traced, other: Traced) -> Iterator[tuple[str, int | None, list, list]]:
    """(name, axis, size in `ref`, size in `other`) of each tensor whose size differs between
    two models on an axis no space holds (axis None: another number of axes); a tied tensor
    is checked under its first name, where its axes are."""
    mine = named_tensors(other.graph_module)
    canonical = canonical_names(ref.graph_module)
    for name, a in named_tensors(ref.graph_module).items():
        b = mine.get(name)
        if b is None or a.shape == b.shape or canonical.get(name, name) != name:
            continue
        if a.dim() != b.dim():
            yield name, None, list(a.shape), list(b.shape)
            continue
        axes = ref.space_table.param_axes.get(name, {})
        d = next((d for d, (x, y) in enumerate(zip(a.shape, b.shape))
                  if x != y and d not in axes), None)
        if d is not None:
            yield name, d, list(a.shape), list(b.shape)


def _check_unaligned_sizes(ref: Traced, other: Traced, i: int) -> None:
    """MismatchError when a tensor's size differs between the models on an axis that is in no
    space: nothing could bring the two to one width (a raw shape error later)."""
    for name, d, a, b in _unaligned_sizes(ref, other):
        if d is None:
            raise MismatchError(f"`{name}` has shape {b} in model {i} and {a} in model 0 "
                                f"(another number of axes)")
        raise MismatchError(
            f"`{name}` has size {b[d]} on axis {d} in model {i} and {a[d]} in model 0, and no "
            f"space holds that axis (no op rule placed it), so the two widths cannot be "
            f"aligned; models must agree on it, or the op that reads `{name}` needs a "
            f"rule{_opaque_hint(ref, name)}")


def unaligned_owners(traced: Sequence[Traced]) -> list[str]:
    """The owners (module paths; "" for the root) of the tensors whose size differs between
    model 0 and another model on an axis no space holds: this capture cannot bring them to
    one width."""
    return list(dict.fromkeys(name.rpartition(".")[0] for t in traced[1:]
                              for name, d, _, _ in _unaligned_sizes(traced[0], t)
                              if d is not None))


def _opaque_hint(ref: Traced, name: str) -> str:
    """Where `name` belongs to a module the graph calls as one opaque op (an fx leaf, such as
    nn.MultiheadAttention), the capture that opens it up."""
    owner = name.rpartition(".")[0]
    for n in ref.graph.nodes:
        if n.op == "call_module" and n.target == owner:
            kind = type(ref.graph_module.get_submodule(owner)).__name__
            return (f" (`{owner}` is one opaque {kind} call in this capture; "
                    f"frontend=\"export\" records the ops inside it, where a rule may place "
                    f"that axis)")
    return ""

"""Layer-segment expansion as graph surgery: a shallower model made as deep as a reference of
its family, computing the same function.

The expanded model is the reference's graph (`graphmerge.graph.stages` finds its stages and
trunk) carrying the shallow model's tensors: every trunk node and every unit the shallow model
has takes its tensors from the node it corresponds to, and each other position of a stage keeps
a copy of the reference's unit made an **identity unit**:

- a residual unit's branches output exactly zero: the layer that writes each branch into the
  stream (found back from the add through products, indexing, reshapes and dropout) has the
  parameters that produce its output space zeroed; a ReLU after the add is the identity because
  its input is proven non-negative from the graph; a BatchNorm after it becomes the identity; a
  LayerNorm after it (post-norm, x ← LN(x + f(x))) has no identity, so its affine is fitted by
  least squares to reproduce its input on calibration data, and the error left is reported.
- a plain unit (linear/conv → norm → activation) becomes W = I, an identity norm and its
  activation, exact when its input lies where the activation is the identity (ReLU after ReLU,
  ReLU6 after ReLU6, …: proven from the graph, `graphmerge.graph.kinds.value_range`).
- a dense layer (x ← cat([x, f(x)])) writes zeros (f's producer zeroed): the stream gains a
  piece of zeros at its place in every later concatenation, and every tensor moved from the
  model that reads the stream gets zeros there (`_pad_concatenations`); a norm that mixes the
  units of such a concatenation (layer, group, RMS) would see other statistics and is refused.

Which axis of which tensor changes width comes from the space tables, never from sizes: an
inserted unit's axes in a space the shallow model also has take the shallow width; shape
constants follow (`graphmerge.graph.literals`). Every expansion is checked on the example inputs.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import (
    ConfigError,
    GraphmergeError,
    InexactExpansionWarning,
    MismatchError,
    summarize,
)
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.kinds import (
    family,
    identity_on,
    is_activation,
    is_norm,
    is_pass,
    kind,
    node_key,
    norm_eps,
    tensor_args,
    value_range,
)
from graphmerge.graph.literals import find_literals, merged_widths, resize_literals
from graphmerge.graph.oracle import output_error
from graphmerge.graph.stages import (
    Stage,
    Unit,
    aligned_stages,
    branch_producer,
    corresponding_stages,
    is_add,
    is_affine,
    readers,
    through_identity,
    trunk,
)
from graphmerge.inputs import as_inputs
from graphmerge.match.align import align
from graphmerge.match.statistics import feature_module
from graphmerge.graph.tensors import (
    get_tensor,
    named_tensors,
    resize_axes,
    set_tensor,
    sync_module_attributes,
)

__all__ = ["expand", "deepen", "fit_post_norms", "plan_depths", "topology"]

log = logging.getLogger(__name__)


# ---- tensors of a graph module, by qualified name ----------------------------------------


def _node_tensors(n: fx.Node) -> list[str]:
    """Qualified names of every tensor node `n` uses: its module's, or its get_attr inputs."""
    if n.op == "call_module":
        module = n.graph.owning_module.get_submodule(n.target)
        return [f"{n.target}.{k}" for k in named_tensors(module)]
    return [a.target for a in n.all_input_nodes if a.op == "get_attr"]


# ---- correspondence and widths --------------------------------------------------------------


def plan_depths(ref: Traced, ref_stages: Sequence[Stage], traced: Traced,
                stages: Sequence[Stage]) -> dict[int, int]:
    """Per reference stage, the depth of the corresponding stage of `traced` (0: none there).

    Raises:
        MismatchError: the trunks differ, or `traced` is deeper somewhere than `ref`.
    """
    depths = {}
    for i, other in corresponding_stages(ref, ref_stages, traced, stages).items():
        depths[i] = other.depth if other is not None else 0
        if depths[i] > ref_stages[i].depth:
            raise MismatchError(
                f"the {ref_stages[i].name} is deeper in the model ({depths[i]} units) than in "
                f"the reference ({ref_stages[i].depth}); expand towards the deepest model")
    return depths


def _node_map(ref: Traced, ref_stages: Sequence[Stage], traced: Traced, stages: Sequence[Stage],
              positions: dict[int, list[int]]) -> tuple[dict[str, str], list[Unit]]:
    """Reference node name -> model node name for the trunk and the kept units, and the
    reference units that are inserted (no counterpart)."""
    mapping = {a.name: b.name for a, b in zip(trunk(ref, ref_stages), trunk(traced, stages))}
    inserted = []
    for i, other in corresponding_stages(ref, ref_stages, traced, stages).items():
        units = other.units if other is not None else []
        pos = positions.get(i, list(range(len(units))))
        if len(pos) != len(units) or any(b <= a for a, b in zip(pos, pos[1:])) or (
                pos and not 0 <= pos[0] <= pos[-1] < ref_stages[i].depth):
            raise GraphmergeError(
                f"positions {pos} for the {ref_stages[i].name} must be {len(units)} increasing "
                f"indices below {ref_stages[i].depth}")
        kept = dict(zip(pos, units))
        for p, ref_unit in enumerate(ref_stages[i].units):
            unit = kept.get(p)
            if unit is None:
                inserted.append(ref_unit)
            elif unit.signature != ref_unit.signature:
                k = next((k for k, (a, b) in enumerate(zip(ref_unit.signature, unit.signature))
                          if a != b), min(len(unit.signature), len(ref_unit.signature)))
                ops = [" ".join(u.signature[k]) if k < len(u.signature) else "nothing"
                       for u in (unit, ref_unit)]
                raise MismatchError(
                    f"unit {p} of the reference's {ref_stages[i].name} and the model's unit at "
                    f"`{unit.input}` differ in their ops (op {k}: {ops[0]} where the reference "
                    f"has {ops[1]}); they cannot correspond: the models build this block "
                    f"differently (a configuration that changes its ops, such as a key/value "
                    f"head count that skips a repeat; or a model that caches values in eval "
                    f"mode and traces differently once it has run: run every model once, or "
                    f"none, before merging)")
            else:
                mapping.update(zip(ref_unit.nodes, unit.nodes))
    return mapping, inserted


def _width(traced: Traced, node: str, dim: int) -> int | None:
    base, _, piece = node.partition("#")
    shape = traced.shapes.get(base)
    if piece and isinstance(shape, tuple):
        shape = shape[int(piece)] if int(piece) < len(shape) else None
    return shape[dim] if isinstance(shape, tuple) and dim < len(shape) and isinstance(
        shape[dim], int) else None


def _widths(ref: Traced, traced: Traced, mapping: dict[str, str], gm: nn.Module,
            moved: set[str], inserted: Sequence[Unit]) -> tuple[dict[int, int], set[int]]:
    """The width of every reference space in the expanded model `gm`: the model's width where
    a node of the space has a counterpart or a tensor on it was moved over (`moved`), an
    inserted identity layer's input width on its output, the reference's elsewhere inside
    inserted units. Second: the base spaces the model has (the others are the inserted
    units' own)."""
    base = {}
    for space in ref.space_table:
        if space.derived is not None:
            continue
        for m in space.members:
            name, _, piece = m.node.partition("#")
            if name in mapping:
                w = _width(traced, mapping[name] + (f"#{piece}" if piece else ""), m.dim)
                if w is not None:
                    base[space.id] = w
                    break
        else:
            axis = next((a for a in space.params if a.param in moved), None)
            if axis is not None:
                base[space.id] = get_tensor(gm, axis.param).shape[axis.dim]
    table, present = ref.space_table, set(base)
    for unit in inserted:  # an identity layer writes the width it reads
        if unit.kind == "layer":
            ins, outs = table.node_axes.get(unit.input, {}), table.node_axes.get(unit.output, {})
            for d in ins.keys() & outs.keys():
                base[outs[d]] = base.get(ins[d], table[ins[d]].width)
    return merged_widths(table, base), present


def _layout(table, sid: int, widths: dict[int, int], present: set[int]
            ) -> list[tuple[int, bool]]:
    """Space `sid` as the pieces it concatenates, in order: (width, whether the model has it).
    A dense layer inserted into a block appends a piece the model lacks to every later
    concatenation of the stream."""
    d = table[sid].derived
    if d is None or d.kind != "cat":
        return [(widths[sid], d is not None or sid in present)]
    return [piece for p, w in zip(d.parts, d.sizes)
            for piece in ([(w, True)] if p is None else _layout(table, p, widths, present))]


def _check_channelwise_readers(ref: Traced, inserted: Sequence[Unit], widths: dict[int, int],
                               present: set[int]) -> None:
    """Raises MismatchError where a norm that mixes units (a layer, group or RMS norm)
    normalises a concatenation that an inserted dense layer widens with zeros: its statistics
    would change. A batch norm, a linear or an activation reads each unit alone."""
    if not any(u.kind == "concat" for u in inserted):
        return
    table = ref.space_table
    for n in ref.graph.nodes:
        if not is_norm(n) or kind(n) == "batch_norm":
            continue
        for a in n.all_input_nodes:
            for dim, sid in table.node_axes.get(a.name, {}).items():
                if not all(has for _, has in _layout(table, sid, widths, present)):
                    raise MismatchError(
                        f"`{n.name}` ({kind(n)}) normalises across the concatenation "
                        f"`{a.name}` that a dense layer inserted to deepen the model widens "
                        f"with zeros: its statistics would change, so dense blocks of "
                        f"different depths merge only where each unit of the concatenation is "
                        f"normalised alone (a batch norm)")


def _pad_concatenations(gm: nn.Module, table, names: Iterable[str], widths: dict[int, int],
                        present: set[int]) -> None:
    """Give each moved tensor (named in `names`) zeros where an axis of it lies on a
    concatenation that an inserted dense layer widened: the layer writes zeros there, and its
    readers, zero-weighted, ignore them."""
    for name in names:
        t = get_tensor(gm, name)
        for dim, sid in table.param_axes.get(name, {}).items():
            pieces = _layout(table, sid, widths, present)
            if all(has for _, has in pieces) or t.shape[dim] == sum(w for w, _ in pieces):
                continue  # nothing inserted there, or a tied name already padded
            if sum(w for w, has in pieces if has) != t.shape[dim]:
                raise GraphmergeError(
                    f"cannot lay the model's `{name}` (axis {dim}, width {t.shape[dim]}) out "
                    f"on the deeper block's concatenation of widths {[w for w, _ in pieces]}")
            chunks, at = [], 0
            for w, has in pieces:
                if has:
                    chunks.append(t.detach().narrow(dim, at, w))
                    at += w
                else:
                    shape = list(t.shape)
                    shape[dim] = w
                    chunks.append(torch.zeros(shape, dtype=t.dtype, device=t.device))
            t = torch.cat(chunks, dim)
            set_tensor(gm, name, t)


# ---- identity units -------------------------------------------------------------------------


def _set(gm: nn.Module, name: str, fill: Any) -> None:
    t = get_tensor(gm, name)
    with torch.no_grad():
        if callable(fill):
            fill(t)
        else:
            t.fill_(fill)


def _identity_norm(gm: nn.Module, node: fx.Node) -> None:
    """A BatchNorm that outputs its input (eval mode): weight 1, bias 0, mean 0, var 1 − eps."""
    args, eps = tensor_args(node), norm_eps(node, gm)
    for role, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                        ("running_var", 1.0 - eps)):
        if role in args:
            _set(gm, args[role], value)


def _zero_branch(gm: nn.Module, table, producer: fx.Node) -> None:
    """Zero the parameters of layer `producer` that write its output space (its `out` axes in
    the space table; all its parameters if the table has none): it then outputs zero."""
    own = set(_node_tensors(producer))
    dims = table.node_axes.get(producer.name) or table.node_axes.get(f"{producer.name}#0", {})
    space = table[dims[max(dims)]] if dims else None
    names = {a.param for a in (space.producers if space else ()) if a.param in own} or own
    params = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
    for name in names:
        if name in params:  # running statistics stay: with a zero affine a norm outputs zero
            _set(gm, name, 0.0)


def _check_identity(act: fx.Node, source: fx.Node, where: str) -> None:
    region, values = identity_on(act), value_range(source)
    if region is None or values is None or not region[0] <= values[0] <= values[1] <= region[1]:
        got = "not bounded by the graph" if values is None else f"in [{values[0]}, {values[1]}]"
        can = "on no interval" if region is None else f"on [{region[0]}, {region[1]}]"
        raise GraphmergeError(
            f"cannot insert an identity unit {where}: its activation `{act.name}` "
            f"({kind(act)}) is the identity {can}, and its input `{source.name}` is {got}. "
            f"Identity units need an activation such as ReLU after ReLU; merge models of equal "
            f"depth instead")


def _make_identity(gm: fx.GraphModule, ref: Traced, unit: Unit, post: list[tuple[str, str]]
                   ) -> None:
    """Turn the copy of reference unit `unit` in `gm` into an identity (see the module
    docstring); LayerNorms on the stream are appended to `post` as (norm, input node)."""
    nodes = [ref.node(n) for n in unit.nodes]
    inside, where = set(nodes), f"at `{unit.input}`"
    if unit.kind == "layer":
        for n in nodes:
            k, args = kind(n), tensor_args(n)
            if k == "linear":
                _set(gm, args["weight"], lambda w: w.copy_(
                    torch.eye(*w.shape, device=w.device, dtype=w.dtype)))
            elif k == "conv":
                groups = gm.get_submodule(n.target).groups if n.op == "call_module" else (
                    n.args[6] if len(n.args) > 6 else 1)
                _set(gm, args["weight"], lambda w: nn.init.dirac_(w, groups))
            elif k == "batch_norm":
                _identity_norm(gm, n)
            elif is_norm(k):  # a layer or RMS norm (a batch norm: above)
                raise GraphmergeError(f"cannot insert an identity unit {where}: `{n.name}` "
                                      f"({k}) normalises its input and has no identity")
            elif not is_pass(k):  # the activation
                _check_identity(n, ref.node(unit.input), where)
            if family(k) == "linear" and "bias" in args:
                _set(gm, args["bias"], 0.0)
        return
    table = ref.space_table
    if unit.kind == "concat":  # x <- cat([x, f(x)]) (one per layer of a unit of several):
        stream = ref.node(unit.input)  # each f writes zeros, read by zero weights
        for n in nodes:
            if kind(n) == "cat" and n.args[0][0] is stream:
                branch, stream = n.args[0][1], n
                producer = branch_producer(branch, inside)
                if producer is None:
                    raise GraphmergeError(f"cannot insert a dense layer {where}: its output "
                                          f"`{branch.name}` has no layer to zero")
                _zero_branch(gm, table, producer)
        return
    stream = {ref.node(unit.input)}
    for n in nodes:
        inputs = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if is_affine(n) and len(inputs) == 1 and inputs[0] in stream:  # w = 1, b = 0
            for name in _node_tensors(n):
                _set(gm, name, 1.0 if kind(n) == "mul" else 0.0)
            stream.add(n)
        elif is_add(n):
            skip = [a for a in inputs if a in stream or through_identity(a) in stream]
            branch = [a for a in inputs if a not in skip]
            if len(skip) == 1 and len(branch) == 1:
                producer = branch_producer(branch[0], inside)
                if producer is None:
                    raise GraphmergeError(f"cannot make the unit {where} an identity: its "
                                          f"branch `{branch[0].name}` has no layer to zero")
                _zero_branch(gm, table, producer)
                stream.add(n)
        elif len(inputs) == 1 and inputs[0] in stream and len(readers(inputs[0])) == 1 \
                and n.op != "output":  # the stream itself goes through n (a post-op)
            k = kind(n)
            if k == "batch_norm":
                _identity_norm(gm, n)
            elif k == "layer_norm":
                post.append((n.name, inputs[0].name))
            elif is_activation(k, pointwise=True) or is_norm(k):  # a norm: the identity nowhere
                _check_identity(n, _stream_source(inputs[0], stream), where)
            elif not is_pass(k):
                continue
            stream.add(n)


def _stream_source(n: fx.Node, stream: set[fx.Node]) -> fx.Node:
    """The value an op after a zeroed add sees: the add passes its skip operand through."""
    while is_add(n):
        n = next(a if a in stream else through_identity(a) for a in n.all_input_nodes
                 if a in stream or through_identity(a) in stream)
    return n


def fit_post_norms(gm: fx.GraphModule, norms: Sequence[tuple[str, str]],
                   batches: Sequence[tuple[Any, ...]]) -> dict[str, float]:
    """Give each post-norm (node, its input node) of an inserted unit, whose branch is zero so
    that its input is the stream x, the per-channel affine that best reproduces x from LN's
    normalised x: closed-form least squares over every position of `batches`, in forward order.
    Returns, per norm (named by its weight's owner), the relative error ||LN(x) − x|| / ||x||."""
    errors: dict[str, float] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, source in norms:
        node = nodes[name]
        args = tensor_args(node)
        if "weight" not in args or "bias" not in args:
            raise GraphmergeError(f"the post-norm `{name}` has no weight and bias to fit")
        runner = set_eval(feature_module(gm, [source]))
        with torch.no_grad():
            x = torch.cat([runner(*inputs)[1][source].detach().double().reshape(
                -1, get_tensor(gm, args["weight"]).shape[-1]) for inputs in batches])
        eps = norm_eps(node)
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True)
                                                       + eps)
        zc, xc = z - z.mean(0), x - x.mean(0)
        w = (zc * xc).sum(0) / (zc * zc).sum(0).clamp_min(1e-12)
        b = x.mean(0) - w * z.mean(0)
        weight, bias = get_tensor(gm, args["weight"]), get_tensor(gm, args["bias"])
        with torch.no_grad():
            weight.copy_(w.to(weight.dtype))
            bias.copy_(b.to(bias.dtype))
        errors[args["weight"].rpartition(".")[0]] = float(
            (z * w + b - x).norm() / x.norm().clamp_min(1e-12))
    return errors


# ---- expansion ------------------------------------------------------------------------------


def expand(model: nn.Module, traced: Traced, stages: Sequence[Stage], ref: Traced,
           ref_stages: Sequence[Stage], positions: dict[int, list[int]],
           example_inputs: Any, rtol: float = 1e-5,
           calibration: Sequence[tuple[Any, ...]] = ()
           ) -> tuple[fx.GraphModule, dict[str, float], list[str]]:
    """`model` (traced as `traced`, with `stages`) grown to the depth of reference `ref` (with
    `ref_stages`, see `graphmerge.graph.stages.aligned_stages`): a copy of `ref`'s graph module
    carrying `model`'s tensors, with identity units at the positions of each reference stage
    that `positions[s]` (the places of the model's units, increasing; default 0, 1, …) leaves
    free. Checked to compute `model`'s outputs on `example_inputs`.

    Post-norm units (x ← LN(x + f(x))) cannot be exact: their norms get the affine that best
    reproduces their input on `calibration` (default: the example inputs); the returned dict
    gives, per fitted norm, the relative error left, and an InexactExpansionWarning names them.
    Everywhere else exactness is required (GraphmergeError otherwise). The third result lists
    the nodes inside the inserted units (their activations say nothing about `model`; a unit's
    output, equal to its input, does)."""
    mapping, inserted = _node_map(ref, ref_stages, traced, stages, positions)
    gm = copy.deepcopy(ref.graph_module)
    source = traced.graph_module
    memo: dict[int, Any] = {}  # one copy per source object: tied weights stay tied
    moved: set[str] = set()    # the reference's tensor names that now hold the model's
    ref_nodes = {n.name: n for n in ref.graph.nodes}
    src_nodes = {n.name: n for n in traced.graph.nodes}
    for r_name, s_name in mapping.items():
        r, s = ref_nodes[r_name], src_nodes[s_name]
        if r.op == "call_module":
            gm.set_submodule(r.target, copy.deepcopy(source.get_submodule(s.target), memo))
            moved.update(f"{r.target}.{k}" for k in named_tensors(gm.get_submodule(r.target)))
        for ra, sa in zip(r.all_input_nodes, s.all_input_nodes):
            if ra.op == "get_attr" and sa.op == "get_attr":
                # every name of the reference's tensor takes it: a buffer the reference's
                # units share (a causal mask) stays shared with the inserted units
                set_tensor(gm, ra.target, copy.deepcopy(get_tensor(source, sa.target), memo))
                moved.add(ra.target)
    widths, present = _widths(ref, traced, mapping, gm, moved, inserted)
    table = ref.space_table
    _check_channelwise_readers(ref, inserted, widths, present)
    _pad_concatenations(gm, table, sorted(moved), widths, present)
    for unit in inserted:
        for name in dict.fromkeys(t for n in unit.nodes for t in _node_tensors(ref.node(n))):
            dims = table.param_axes.get(name, {})
            old = get_tensor(gm, name)
            new = resize_axes(old, dims, widths)
            if new.shape != old.shape:
                set_tensor(gm, name, new)
    sync_module_attributes(gm)
    resize_literals(gm, find_literals(ref), widths)
    gm.recompile()
    post: list[tuple[str, str]] = []
    for unit in inserted:
        _make_identity(gm, ref, unit, post)
    set_eval(gm)
    inputs = as_inputs(example_inputs)
    try:
        fit = fit_post_norms(gm, post, list(calibration) or [inputs]) if post else {}
        err = output_error(model, gm, inputs)
    except Exception as e:  # a width the graph does not hold (a module attribute)
        raise GraphmergeError(
            f"the expanded {type(model).__name__} does not run ({summarize(e)}): a width is held outside the graph's shape constants (a module "
            f"attribute such as nn.MultiheadAttention's embed_dim, or a size computed in "
            f"Python such as d // heads); deepen towards a reference of the model's widths") from e
    if post:
        warnings.warn(
            f"{type(model).__name__} has post-norm units (x <- LN(x + f(x))), for which no "
            f"identity exists: the inserted units' norms were fitted to reproduce their input, "
            f"leaving relative errors {', '.join(f'{k} {v:.1e}' for k, v in fit.items())} "
            f"(output error {err:.1e})", InexactExpansionWarning, stacklevel=2)
    elif err > rtol:
        raise GraphmergeError(
            f"the identity expansion of {type(model).__name__} is not exact (relative error "
            f"{err:.1e}); please report this model: every inserted unit was proven an identity")
    log.info("expanded %s by %d units", type(model).__name__, len(inserted))
    return gm, fit, [n for unit in inserted for n in unit.nodes if n != unit.output]


def topology(traced: Traced) -> list[tuple[str, str]]:
    """The op sequence of a graph (parameters aside): equal for models that differ in widths
    only."""
    return [node_key(n) for n in traced.graph.nodes if n.op != "get_attr"]


def deepen(model: nn.Module, example_inputs: Any, reference: nn.Module,
           positions: Sequence[Sequence[int]] | None = None,
           calibration: Sequence[tuple[Any, ...]] = (), frontend: str = "auto") -> nn.Module:
    """`model` expanded to `reference`'s depth in every stage, with identity units (templates
    from `reference`), as a graph module of the reference's graph. `positions[s]` places
    model's units in the reference's stage s (default: evenly, first and last fixed). Computes
    exactly the function of `model`, except for post-norm units, whose norms are fitted on
    `calibration` (see `expand`)."""
    if positions is not None and (isinstance(positions, (str, bytes)) or not all(
            isinstance(p, Sequence) and not isinstance(p, str)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
            for p in positions)):
        raise ConfigError(f"positions must be one list of unit indices per stage of the "
                          f"reference (e.g. [[0, 2]]), got {positions!r}")
    if isinstance(calibration, (torch.Tensor, str)) or not isinstance(calibration, Iterable):
        raise ConfigError("calibration must be a list of batches (e.g. [x[:64], x[64:]]), got "
                          f"{type(calibration).__name__}")
    traced = trace(model, example_inputs, frontend=frontend)
    ref = trace(reference, example_inputs, frontend=frontend)
    if topology(traced) == topology(ref):
        return copy.deepcopy(model)
    found: dict[int, int] = {}

    def check(stages: list[list[Stage]], _: int) -> None:
        if not stages[1]:
            raise MismatchError(
                f"no units of depth were found in the reference {type(reference).__name__}: "
                f"neither residual units (x + f(x) with a layer ending f) nor plain layers "
                f"(linear/conv → activation keeping the shape); see graphmerge.graph.stages")
        found.update(plan_depths(ref, stages[1], traced, stages[0]))

    (stages, ref_stages), _, _ = aligned_stages([traced, ref], check)
    depths = found
    if all(depths[i] == s.depth for i, s in enumerate(ref_stages)):
        return copy.deepcopy(model)
    chosen = {i: (list(positions[i]) if positions is not None else
                  align(np.zeros((s.depth, depths[i])), "uniform") if depths[i] else [])
              for i, s in enumerate(ref_stages)}
    return expand(model, traced, stages, ref, ref_stages, chosen, example_inputs,
                  calibration=calibration)[0]

"""The permutation oracle: a model with every free space randomly permuted computes the same function.

`permute(model, inputs)` returns such a copy; `check_spaces(model, inputs)` verifies the space
table of a model by comparing every node of the permuted graph with the original node's value
transformed by its spaces' permutations, and names the first op that breaks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from graphmerge.errors import ConfigError, SpaceCheckError
from graphmerge.graph.analyse import Analysed, trace
from graphmerge.graph.capture import (
    eval_mode,
    plain_weights,
    run_nodes,
    set_eval,
)
from graphmerge.graph.spaces import SpaceTable
from graphmerge.graph.transforms import SELECTIONS, Selection, compose
from graphmerge.inputs import as_inputs
from graphmerge.graph.tensors import named_tensors, take

__all__ = ["draw_permutations", "apply_permutations", "permute", "check_spaces", "OracleReport",
           "output_error", "check_seed", "check_tolerance", "to_double", "double_copy"]


def draw_permutations(table: SpaceTable, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """A random permutation (index tensor) for every space: free base spaces draw one, frozen
    spaces keep the identity, derived spaces are composed from their parts. Attention heads
    (`SpaceTable.heads`) are permuted as wholes and each head's dims by a permutation of its
    own: a head dim's entry is then [heads, dim], row g permuting the dims of new head g. The
    groups of a grouped op are heads too; their shared dims (`SpaceTable.shared_dims`) draw one
    permutation for every group."""
    base: dict[int, torch.Tensor] = {
        s.id: torch.arange(s.width) if s.frozen else torch.randperm(s.width, generator=generator)
        for s in table if s.derived is None}
    projections: dict[int, torch.Tensor] = {}
    for h, ks in table.heads.items():
        for k, d in ks:
            width = table[d].width
            if table[d].frozen:  # a head dim that keeps the identity: whole heads move
                inside = torch.arange(width)
            elif d in table.shared_dims:  # one permutation for every head (group)
                inside = base[d]
            else:  # one permutation per head, drawn once per head dim
                if base[d].dim() == 1:
                    base[d] = torch.stack([torch.randperm(width, generator=generator)
                                           for _ in range(table[h].width)])
                inside = base[d]
            group = table.head_groups.get(k, 1)  # heads × group × dim: the group keeps its order
            inside = inside.reshape(-1, 1, width) + torch.arange(group)[:, None] * width
            projections[k] = (base[h][:, None, None] * group * width + inside).reshape(-1)

    def own(sid: int, _: bool) -> Selection | None:
        if sid in projections:
            return Selection.of(projections[sid], len(projections[sid]))
        return Selection.of(base[sid], len(base[sid])) if sid in base else None

    return {s.id: base[s.id] if base.get(s.id, torch.empty(0)).dim() == 2
            else compose(table, s.id, own, SELECTIONS).index for s in table}


def apply_permutations(module: nn.Module, table: SpaceTable, perms: dict[int, torch.Tensor],
                       rebind: bool = False) -> int:
    """Permute, in place, every parameter/buffer axis of `module` that belongs to a space
    (`rebind`: the module's attributes are bound to new permuted tensors instead, and the
    tensors they held, and any value that views them, are left as they were).

    Returns the number of tensors whose values changed. A tensor shared under several names is
    permuted once.
    """
    named = named_tensors(module)
    by_tensor: dict[int, tuple[torch.Tensor, dict[int, int]]] = {}
    for name, dims in table.param_axes.items():
        t = named.get(name)
        if t is None:  # a constant the forward code creates: its axes keep the identity
            if all(table[sid].frozen for sid in dims.values()):
                continue
            raise SpaceCheckError(f"tensor `{name}` of the graph is not in the module, but its "
                                  f"axes are in free spaces {sorted(dims.values())}")
        entry = by_tensor.setdefault(id(t), (t, {}))
        for dim, sid in dims.items():
            if entry[1].setdefault(dim, sid) != sid:
                raise SpaceCheckError(
                    f"tensor `{name}` is shared under several names whose axis {dim} belongs to "
                    f"different spaces ({entry[1][dim]} and {sid}); untie the weights first.")
    changed = 0
    with torch.no_grad():
        for t, dims in by_tensor.values():
            new = _transform(t, dims, perms, table)
            if not torch.equal(new, t):
                changed += 1
            if rebind:
                _bind(module, [n for n, u in named.items() if u is t], t, new)
            else:
                t.copy_(new)
    return changed


def _bind(module: nn.Module, names: list[str], old: torch.Tensor, new: torch.Tensor) -> None:
    """Bind every name of `old` (a parameter or buffer of `module`) to `new`, one tensor."""
    if isinstance(old, nn.Parameter):
        new = nn.Parameter(new, requires_grad=old.requires_grad)
    for name in names:
        owner, _, attr = name.rpartition(".")
        sub = module.get_submodule(owner)
        if isinstance(new, nn.Parameter):
            sub._parameters[attr] = new
        else:
            sub._buffers[attr] = new


def permute(model: nn.Module, example_inputs: Any, seed: int = 0,
            leaf_modules: Iterable[type[nn.Module] | str] = (), frontend: str = "auto",
            rtol: float = 1e-4) -> nn.Module:
    """A functionally identical copy of `model` with every free space randomly permuted.

    The copy is checked: its outputs on the example inputs must equal the model's (relative
    error < `rtol`); otherwise the oracle names the op whose rule broke, and SpaceCheckError
    is raised. The model itself is not modified.

    Example:
        >>> import torch, graphmerge as gm
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(5, 4)
        >>> p = gm.permute(m, x, seed=1)
        >>> torch.allclose(m(x), p(x), atol=1e-6), torch.equal(m[0].weight, p[0].weight)
        (True, False)
    """
    check_seed(seed)
    check_tolerance(rtol)
    inputs = as_inputs(example_inputs)
    table = trace(model, inputs, frontend=frontend, leaf_modules=leaf_modules).space_table
    out = plain_weights(model)  # a copy already when it has parametrized weights
    out = copy.deepcopy(model) if out is model else out
    apply_permutations(out, table, draw_permutations(table, torch.Generator().manual_seed(seed)))
    err = output_error(model, out, inputs)
    if err > rtol:
        check_spaces(model, inputs, trials=3, leaf_modules=leaf_modules, frontend=frontend)
        raise SpaceCheckError(
            f"permuting {type(model).__name__} changed its outputs (relative error {err:.1e} > "
            f"{rtol:.0e}) although the node-by-node oracle found no broken op in float64; the "
            f"model may compute in low precision or read its parameters outside the graph.")
    return out


def check_tolerance(rtol: Any, what: str = "rtol") -> float:
    """A positive finite tolerance; ConfigError otherwise (a NaN one would accept anything)."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (
            math.isfinite(rtol) and rtol > 0):
        raise ConfigError(f"{what} must be a positive number, got {rtol!r}")
    return float(rtol)


def check_seed(seed: Any) -> int:
    """A random seed: an int (not a bool); ConfigError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    return seed


def output_error(a: nn.Module, b: nn.Module, inputs: tuple[Any, ...]) -> float:
    """Largest relative error between the tensor outputs of `a` and `b` (eval mode, no grad)."""
    with torch.no_grad(), eval_mode(a), eval_mode(b):
        ya, yb = tree_leaves(a(*inputs)), tree_leaves(b(*inputs))
    pairs = [(p, q) for p, q in zip(ya, yb) if isinstance(p, torch.Tensor)]
    return max((_rel_error(p, q) for p, q in pairs), default=0.0)


@dataclass
class OracleReport:
    """What `check_spaces` measured."""

    trials: int
    free_spaces: int
    frozen_spaces: int
    changed_tensors: int          # tensors whose values changed, summed over trials
    max_output_error: float       # relative error of the outputs, max over trials


def _transform(value: torch.Tensor, dims: dict[int, int], perms: dict[int, torch.Tensor],
               table: SpaceTable) -> torch.Tensor:
    """`value` with each axis permuted by its space; a head dim (a [heads, dim] permutation)
    after its heads axis, head by head. The permutations (drawn on the CPU, so that a seed
    draws the same ones on every device) are moved to `value`'s device."""
    heads_of = {d: h for h, ks in table.heads.items() for _, d in ks}
    for dim, sid in sorted(dims.items(), key=lambda item: perms[item[1]].dim()):
        perm = perms[sid].to(value.device)
        if perm.dim() == 1:
            value = take(value, dim, perm)
            continue
        heads = next((d for d, s in dims.items() if s == heads_of[sid]), None)
        if heads is None:  # grouped queries: heads × group laid out on one axis
            heads = next((d for d, s in dims.items() if table[s].derived is not None
                          and table[s].derived.parts[0] == heads_of[sid]), None)
            if heads is not None:
                perm = perm.repeat_interleave(value.shape[heads] // len(perm), dim=0)
        if heads is None:
            raise SpaceCheckError(f"a value has an axis in head dim {sid} but none in its heads "
                                  f"space {heads_of[sid]}")
        moved = value.movedim((heads, dim), (-2, -1))
        index = perm.expand(*moved.shape[:-2], *perm.shape)
        value = moved.gather(-1, index).movedim((-2, -1), (heads, dim))
    return value


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.is_floating_point():
        return 0.0 if torch.equal(a, b) else float("inf")
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def check_spaces(model: nn.Module, example_inputs: Any, trials: int = 3, rtol: float = 1e-5,
                 leaf_modules: Iterable[type[nn.Module] | str] = (),
                 traced: Analysed | None = None, frontend: str = "auto",
                 own: bool = False) -> OracleReport:
    """Verify a model's space table with random permutations, in float64 and eval mode.

    For each trial, every node of the permuted graph must equal the original node's value with
    each of its axes permuted by its space (relative error < `rtol`). The first node that does
    not is reported with its op and spaces: that op's rule is wrong.

    `traced`: the model's trace (`graphmerge.trace`) to check instead of a float64 trace of
    its own; the check then runs in that trace's precision and inputs. `own`: the trace's
    module is a copy the oracle may change (its last trial permutes it in place instead of
    permuting a second copy); a float64 trace of its own always is.

    Raises:
        SpaceCheckError: naming the node, op and spaces that broke the function.
        ConfigError: trials < 1 or rtol <= 0 (a check that checks nothing is refused).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be an int >= 1, got {trials!r}")
    check_tolerance(rtol)
    if traced is not None and not isinstance(traced, Analysed):
        raise ConfigError(f"traced must be what graphmerge.trace returns, got "
                          f"{type(traced).__name__}")
    inputs = as_inputs(example_inputs)
    if traced is None:
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in inputs)
        model64 = set_eval(double_copy(model))
        traced = trace(model64, inputs, frontend=frontend, leaf_modules=leaf_modules)
        own = True
    table = traced.space_table
    gm = traced.graph_module
    with eval_mode(gm):  # a given trace shares its modules with the caller's model
        changed, worst = _trials(gm, table, inputs, trials, rtol, own)
    return OracleReport(trials, len(table.free), len(table) - len(table.free), changed, worst)


def _trials(gm: fx.GraphModule, table: SpaceTable, inputs: tuple[Any, ...], trials: int,
            rtol: float, own: bool = False) -> tuple[int, float]:
    """Run the oracle's trials: (tensors changed, worst relative output error). Each trial
    permutes a copy of `gm`, the last one `gm` itself when it is `own`: its weights are bound
    to permuted tensors one at a time, with no copy of the whole module first (the reference
    values keep the weights they read)."""
    reference = run_nodes(gm, inputs)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    changed, worst = 0, 0.0
    for trial in range(trials):
        perms = draw_permutations(table, torch.Generator().manual_seed(trial))
        last = own and trial == trials - 1  # then gm's own weights are not needed any more
        permuted = gm if last else copy.deepcopy(gm)
        changed += apply_permutations(permuted, table, perms, rebind=last)
        values = run_nodes(permuted, inputs)
        for n in gm.graph.nodes:
            _check_node(n, reference, values, table, perms, rtol, trial)
        outs: list[fx.Node] = []
        fx.node.map_arg(out_node.args, lambda a: outs.append(a) or a)
        for o in outs:
            if isinstance(reference[o.name], torch.Tensor):
                worst = max(worst, _rel_error(reference[o.name], values[o.name]))
    return changed, worst


def double_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of `model` (`to_double` of a deep copy), whose floating parameters and
    buffers are converted as they are copied: no copy in their own dtype first."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in memo:
            new = t.detach().to(torch.float64, copy=True)
            memo[id(t)] = (nn.Parameter(new, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else new)
    return to_double(copy.deepcopy(model, memo))


def to_double(model: nn.Module) -> nn.Module:
    """`model` in float64, plain tensor attributes (constants the forward reads) included."""
    model.double()
    for m in model.modules():
        for key, value in vars(m).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(m, key, value.double())
    return model


def _check_node(n: fx.Node, reference: dict[str, Any], values: dict[str, Any], table: SpaceTable,
                perms: dict[int, torch.Tensor], rtol: float, trial: int) -> None:
    ref = reference.get(n.name)
    pieces: list[tuple[str, Any, Any]] = []
    if isinstance(ref, torch.Tensor):
        pieces.append((n.name, ref, values[n.name]))
    elif isinstance(ref, (tuple, list)):
        pieces.extend((f"{n.name}#{k}", r, v) for k, (r, v) in enumerate(zip(ref, values[n.name]))
                      if isinstance(r, torch.Tensor))
    for name, r, v in pieces:
        dims = table.node_axes.get(name, {})
        expected = _transform(r, dims, perms, table)
        err = _rel_error(expected, v)
        if err > rtol:
            where = ", ".join(f"axis {d} in space {s} (width {table[s].width})"
                              for d, s in sorted(dims.items())) or "no permuted axis"
            target = n.target if isinstance(n.target, str) else getattr(
                n.target, "__name__", repr(n.target))
            raise SpaceCheckError(
                f"the permutation oracle failed at node `{name}` ({n.op} `{target}`), trial "
                f"{trial}: relative error {err:.2e} > {rtol:.0e}. Its value lives in {where}; the "
                f"axis rule of this op (or of the op producing its inputs) links axes that do not "
                f"share one transform. Fix the rule in graphmerge/graph/rules/ or trace this block as "
                f"a leaf module so its axes are frozen.")

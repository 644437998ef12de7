"""Partial merges (ZipIt!'s "partial zipping"): the graph up to a cut is the merged trunk; after
it every model keeps its own remaining layers, fed from the trunk through its unmerge matrices.

The cut is a node of the (depth-aligned) graph: everything up to it in graph order is the
trunk, taken from the merged module; everything after it is copied once per model with that
model's own tensors. A trunk value read after the cut is mapped into model i's basis by U_i on
each of its axes that belongs to a merged space (an explicit contraction per axis; derived
spaces compose their parts). The models' outputs are averaged (heads="average") or
concatenated on the last axis ("concat").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.graph.capture import Traced
from graphmerge.graph.kinds import kind

__all__ = ["cut_node", "split_at"]


def cut_node(traced: Traced, cut: str | int | float) -> fx.Node:
    """The last trunk node: a node name; a space id (the last node whose output carries the
    space); or a fraction of depth (after that fraction of the weighted layers, in order)."""
    nodes = list(traced.graph.nodes)
    if isinstance(cut, str):
        found = [n for n in nodes if n.name == cut]
        if not found:
            layers = [n.name for n in nodes if kind(n) in ("linear", "conv")]
            raise ConfigError(f"partial={cut!r} is not a node of the graph; weighted layers "
                              f"are: {', '.join(layers[:12])}{' …' if len(layers) > 12 else ''}")
        return found[0]
    if isinstance(cut, int):
        table = traced.space_table
        if not 0 <= cut < len(table):
            raise ConfigError(f"partial={cut} is not a space id (0 … {len(table) - 1})")
        carrying = [n for n in nodes if cut in table.node_axes.get(n.name, {}).values()]
        if not carrying:
            raise ConfigError(f"no node carries space {cut}; choose a node name or a fraction")
        return carrying[-1]
    layers = [n for n in nodes if kind(n) in ("linear", "conv")]
    if not layers:
        raise ConfigError("partial= as a fraction needs weighted layers (linear or conv)")
    return layers[max(1, math.ceil(cut * len(layers))) - 1]


def _contract(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """Axis `dim` of x (size r) mapped by matrix [d, r]: the axis becomes size d."""
    return torch.movedim(torch.tensordot(matrix, x, dims=([1], [dim])), 0, dim)


torch.fx.wrap("_contract")


def split_at(merged: fx.GraphModule, models: Sequence[Traced], cut: fx.Node,
             unmerge: Callable[[int, int], np.ndarray], merged_spaces: Callable[[int], bool],
             head_mode: str) -> tuple[fx.GraphModule, list[dict[str, str]]]:
    """The partial module: `merged`'s graph up to `cut`, then each model's own tail; and per
    model, where each of its nodes is in the partial module (a trunk value read after the
    cut: its value in the model's basis). Model i's tensors are under `model{i}.`.

    Args:
        merged: the fully merged module (model 0's graph carrying merged tensors).
        models: the traced (depth-aligned) models, one graph topology.
        cut: the last trunk node (in model 0's graph; names agree across the models).
        unmerge: (model, space) -> U_i [d_i, r], the unmerge matrix of any space.
        merged_spaces: whether a space is changed by the merge (else its axis passes as is).
        head_mode: "average" or "concat".
    """
    order = [n.name for n in merged.graph.nodes]
    trunk_names = set(order[:order.index(cut.name) + 1])
    table = models[0].space_table
    root = nn.Module()
    root.add_module("trunk", copy.deepcopy(merged))
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}

    def retarget(prefix: str) -> Callable[[fx.Node], fx.Node]:
        def copy_node(n: fx.Node, args_env: dict[str, fx.Node]) -> fx.Node:
            new = graph.node_copy(n, lambda a: args_env[a.name])
            if n.op in ("get_attr", "call_module"):
                new.target = f"{prefix}.{n.target}"
            return new
        return copy_node

    copy_trunk = retarget("trunk")
    for n in merged.graph.nodes:
        if n.name not in trunk_names or n.op == "output":
            continue
        env[n.name] = copy_trunk(n, env)
    outputs: list[list[fx.Node]] = []
    names: list[dict[str, str]] = []
    sequence = False
    for i, model in enumerate(models):
        prefix = f"model{i}"
        root.add_module(prefix, copy.deepcopy(model.graph_module))
        copy_tail = retarget(prefix)
        tail_env: dict[str, fx.Node] = {}
        # nodes computed from the inputs cross the cut; parameters, constants and values made
        # from them alone are the model's own in its tail
        data: set[str] = set()
        for n in model.graph.nodes:
            if n.op == "placeholder" or any(a.name in data for a in n.all_input_nodes):
                data.add(n.name)
            if n.name in trunk_names and n.name in data:
                if any(u.name not in trunk_names for u in n.users) or n.op == "placeholder":
                    tail_env[n.name] = _into_model(graph, root, env[n.name], i, n.name, table,
                                                   unmerge, merged_spaces, models[i])
                continue
            if n.op == "output":
                out = n.args[0]
                leaves = list(out) if isinstance(out, (tuple, list)) else [out]
                if not all(isinstance(a, fx.Node) for a in leaves):
                    raise ConfigError("a partial merge needs models that return a tensor or a "
                                      f"flat tuple of tensors; this one returns {out!r}")
                outputs.append([tail_env[a.name] for a in leaves])
                sequence = isinstance(out, (tuple, list))  # exported graphs return a tuple
                continue
            tail_env[n.name] = copy_tail(n, tail_env)
        names.append({name: node.name for name, node in tail_env.items()})
    results = []
    for values in zip(*outputs):  # each output, across the models
        if head_mode == "concat":
            results.append(graph.call_function(torch.cat, (values, -1)))
        else:
            stacked = graph.call_function(torch.stack, (values,))
            results.append(graph.call_function(torch.mean, (stacked, 0)))
    graph.output(tuple(results) if sequence else results[0])
    module = fx.GraphModule(root, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    module.delete_all_unused_submodules()
    return module.eval(), names


def _home(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a model's values live and their precision: those of its first floating tensor
    (the CPU and float32 for a model without one)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _into_model(graph: fx.Graph, root: nn.Module, value: fx.Node, i: int, name: str, table,
                unmerge: Callable[[int, int], np.ndarray], merged_spaces: Callable[[int], bool],
                model: Traced) -> fx.Node:
    """`value` (a trunk node, merged basis) in model i's basis: U_i on each merged axis."""
    if value.op == "placeholder":
        return value
    shape = model.shapes.get(name)
    dims = table.node_axes.get(name, {})
    if shape is not None and not all(isinstance(s, int) for s in shape) and dims:
        raise ConfigError(f"the cut crosses node `{name}`, which returns several tensors; "
                          f"cut before or after it")
    for dim, sid in sorted(dims.items()):
        if not merged_spaces(sid):
            continue
        attr = f"unmerge{i}_{name}_{dim}"
        device, dtype = _home(model.graph_module)
        root.register_buffer(attr, torch.from_numpy(unmerge(i, sid)).to(device=device,
                                                                         dtype=dtype))
        matrix = graph.get_attr(attr)
        value = graph.call_function(_contract, (value, dim, matrix))
    return value

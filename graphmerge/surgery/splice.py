"""Graph surgery: splice copies of a unit of depth from one graph into another of its family.

`splice(base, insertions)` returns a copy of `base`'s graph module in which, for each
`Insertion`, `count` copies of a donor graph's unit run right after node `after` (the value the
unit reads), and everything that read `after` reads the last copy's output instead. The copies' nodes read
what the donor's unit reads: its input, and trunk values (masks, sizes), taken from `base`
through `trunk_map`; their parameters and submodules are copies of the donor's, registered
under fresh names. Used to build a graph that is as deep as the deepest model in every stage
when no one model is (`graphmerge.passes.depth`); the copies' values are then overwritten or
made identities by `graphmerge.surgery.deepen.expand`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import GraphmergeError
from graphmerge.graph.capture import Traced
from graphmerge.graph.literals import find_literals, resize_literals
from graphmerge.graph.stages import Unit
from graphmerge.graph.tensors import (
    get_tensor,
    named_tensors,
    resize_axes,
    set_tensor,
    sync_module_attributes,
)

__all__ = ["Insertion", "splice"]


def _fresh(gm: nn.Module, target: str) -> str:
    base = "spliced_" + target.replace(".", "_")
    name, k = base, 0
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


@dataclass
class Insertion:
    """`count` copies of `donor`'s `unit` after base node `after`; `trunk_map` maps the donor's
    trunk node names to the base's; the copies' axes in donor spaces listed in `widths` (the
    stream) take the base's width, with their shape constants."""

    after: str
    donor: Traced
    unit: Unit
    count: int
    trunk_map: dict[str, str]
    widths: dict[int, int] = field(default_factory=dict)  # donor space id -> base width


def splice(base: Traced, insertions: list[Insertion]) -> fx.GraphModule:
    """A copy of `base.graph_module` with every insertion made (see the module docstring).

    Raises:
        GraphmergeError: a unit reads a donor value that is neither its input nor trunk.
    """
    gm = copy.deepcopy(base.graph_module)
    for ins in insertions:
        _insert(gm, ins)
    gm.graph.lint()
    gm.recompile()
    return gm


def _insert(gm: fx.GraphModule, ins: Insertion) -> None:
    donor, unit, trunk_map, after, count = (ins.donor, ins.unit, ins.trunk_map, ins.after,
                                            ins.count)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    donor_nodes = [donor.node(name) for name in unit.nodes]
    inside = set(donor_nodes)
    point = nodes[after]
    readers = list(point.users)
    table = donor.space_table
    literals = [lit for lit in find_literals(donor) if lit.node in unit.nodes]
    cursor, stream = point, point
    for _ in range(count):
        env: dict[fx.Node, fx.Node] = {donor.node(unit.input): stream}

        def arg(a: fx.Node, env: dict = env) -> fx.Node:
            nonlocal cursor
            if a in env:
                return env[a]
            if a.op == "get_attr":
                name = _fresh(gm, a.target)
                value = get_tensor(donor.graph_module, a.target)
                if isinstance(value, torch.Tensor):
                    resized = resize_axes(value, table.param_axes.get(a.target, {}), ins.widths)
                    value = nn.Parameter(resized, value.requires_grad) if isinstance(
                        value, nn.Parameter) else resized
                if isinstance(value, nn.Parameter):
                    gm.register_parameter(name, value)
                elif isinstance(value, torch.Tensor):
                    gm.register_buffer(name, value)
                else:
                    setattr(gm, name, value)
                with graph.inserting_after(cursor):
                    env[a] = cursor = graph.get_attr(name)
                return env[a]
            if a in inside or a.name not in trunk_map:
                raise GraphmergeError(
                    f"cannot copy the unit at `{unit.input}`: it reads `{a.name}`, which is "
                    f"neither its input nor a value outside every unit")
            return nodes[trunk_map[a.name]]

        for n in donor_nodes:
            for a in n.all_input_nodes:
                arg(a)
            with graph.inserting_after(cursor):
                copied = graph.node_copy(n, lambda a: env[a] if a in env else arg(a))
            if n.op == "call_module":
                name = _fresh(gm, n.target)
                module = copy.deepcopy(donor.graph_module.get_submodule(n.target))
                for key, t in named_tensors(module).items():
                    dims = table.param_axes.get(f"{n.target}.{key}", {})
                    set_tensor(module, key, resize_axes(t, dims, ins.widths))
                sync_module_attributes(module)
                gm.add_submodule(name, module)
                copied.target = name
            env[n] = cursor = copied
        resize_literals(gm, [replace(lit, node=env[donor.node(lit.node)].name)
                             for lit in literals], ins.widths)
        stream = env[donor.node(unit.output)]
    for r in readers:
        r.replace_input_with(point, stream)

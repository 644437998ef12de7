"""Units of depth: stages of repeatable blocks, found from the traced graph and its spaces.

A *stage* is a run of children of one `nn.Sequential`/`nn.ModuleList` that process a value of
one shape. Its units are either

- residual blocks (a composite child whose graph holds a residual add): every unit but the
  first reads and writes the same space (the residual stream), or
- plain layers (leaf children: linear/conv, optional norm, activation) whose input and output
  shapes agree.

The first unit of a stage may change stride or width; it is always paired with the other
model's first unit. Units are located through `node.meta["nn_module_stack"]`, which torch.fx
records while tracing.
"""

from __future__ import annotations

import pydoc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from graphmerge.graph.capture import Traced

__all__ = ["Unit", "Stage", "find_stages", "is_add"]

_LAYER_OPS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)  # x >= 0 after these: identity units are exact


@dataclass
class Unit:
    """One unit: the container children it spans, its input and output graph nodes."""

    container: str
    children: list[int]
    kind: str                 # "residual" | "layer"
    input: str                # node name of the value entering the unit
    output: str               # node name of the unit's output value


@dataclass
class Stage:
    container: str
    units: list[Unit] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return len(self.units)


def is_add(n: fx.Node) -> bool:
    """Whether node n adds two values (`a + b`, `torch.add`, `a += b`): where a residual branch
    joins its stream."""
    return n.op == "call_function" and getattr(n.target, "__name__", "") in ("add", "iadd")


def _owner(n: fx.Node, container: str) -> int | None:
    """Index of `container`'s child that created node n (from the module stack), else None."""
    stack = n.meta.get("nn_module_stack") or {}
    prefix = f"{container}."
    for path in stack:
        path = path if isinstance(path, str) else str(path)
        if path.startswith(prefix):
            head = path[len(prefix):].split(".")[0]
            if head.isdigit():
                return int(head)
    return None


def _as_class(cls: type | str) -> type:
    """The class a module stack names: torch.export records "pkg.module.Class" strings."""
    if isinstance(cls, type):
        return cls
    found = pydoc.locate(cls)
    return found if isinstance(found, type) else type(cls.rpartition(".")[2], (), {
        "__module__": cls.rpartition(".")[0]})  # an unimportable user class: a stand-in


def _children(nodes: Sequence[fx.Node]) -> dict[str, dict[int, type]]:
    """Container path -> {child index: child class}, read off the recorded module stacks
    (an iterated nn.ModuleList never appears itself, only its numbered children)."""
    out: dict[str, dict[int, type]] = {}
    for n in nodes:
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            path = value[0] if isinstance(value, tuple) else str(key)
            cls = _as_class(value[1]) if isinstance(value, tuple) else type(None)
            head, _, tail = path.rpartition(".")
            if tail.isdigit():
                out.setdefault(head, {})[int(tail)] = cls
    return out


def find_stages(traced: Traced) -> list[Stage]:
    """The stages of a traced model, in graph order (containers with at least one unit)."""
    nodes = list(traced.graph_module.graph.nodes)
    stages = []
    for c, classes in _children(nodes).items():
        per_child: dict[int, list[fx.Node]] = {}
        for n in nodes:
            j = _owner(n, c)
            if j is not None:
                per_child.setdefault(j, []).append(n)
        composite = all(not cls.__module__.startswith("torch.nn") for cls in classes.values())
        if composite:
            stages.extend(s for s in [_residual_stage(c, per_child, traced)] if s.units)
        else:
            stages.extend(_layer_stages(c, classes, per_child, traced))
    # a container nested in another's unit (a shortcut Sequential) is not a stage of its own
    unit_paths = {f"{s.container}.{j}" for s in stages for u in s.units for j in u.children}
    kept = [s for s in stages if not any(s.container.startswith(p + ".") for p in unit_paths)]
    order = {n.name: i for i, n in enumerate(nodes)}
    return sorted(kept, key=lambda s: order[s.units[0].output])


def _io(group: Sequence[fx.Node]) -> tuple[str, str]:
    inside = set(group)
    first_inputs = [a for n in group for a in n.all_input_nodes
                    if a not in inside and a.op != "get_attr"]
    return (first_inputs[0].name if first_inputs else group[0].name), group[-1].name


def _residual_stage(c: str, per_child: dict[int, list[fx.Node]], traced: Traced) -> Stage:
    stage = Stage(c)
    for j in sorted(per_child):
        group = per_child[j]
        inp, out = _io(group)
        has_add = any(is_add(n) for n in group)
        same = traced.shapes.get(inp) == traced.shapes.get(out)
        if not has_add or (stage.units and not same):
            if stage.units:
                break
            continue
        stage.units.append(Unit(c, [j], "residual", inp, out))
    return stage


def _layer_stages(c: str, classes: dict[int, type], per_child: dict[int, list[fx.Node]],
                  traced: Traced) -> list[Stage]:
    """Group leaf children into layers (linear/conv [+ norm] + activation); a stage is a run
    of consecutive layers where every layer after the first keeps the shape (pooling and
    other children end a run)."""
    layers: list[list[int]] = []
    current: list[int] = []
    for j in sorted(per_child):
        m = classes.get(j, type(None))  # a child never called itself (a ModuleList): no layer
        if issubclass(m, _LAYER_OPS):
            current = [j]
        elif current and issubclass(m, _NORMS) and len(current) == 1:
            current.append(j)
        elif current and issubclass(m, _ACTIVATIONS):
            current.append(j)
            layers.append(current)
            current = []
        else:
            current = []
            layers.append([])  # a separator (pooling, dropout, ...): ends a run
    runs: list[list[Unit]] = []
    run: list[Unit] = []
    prev_end = None
    for layer in layers + [[]]:
        if not layer:
            runs.append(run)
            run, prev_end = [], None
            continue
        group = [n for j in layer for n in per_child[j]]
        inp, out = _io(group)
        unit = Unit(c, layer, "layer", inp, out)
        keeps = traced.shapes.get(inp) == traced.shapes.get(out)
        if run and (prev_end != layer[0] - 1 or not keeps):
            runs.append(run)
            run = []
        run.append(unit)
        prev_end = layer[-1]
    return [Stage(c, r) for r in runs if r]

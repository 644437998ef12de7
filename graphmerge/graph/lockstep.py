"""Run several graphs of one topology node by node, in step, looking at every node's values.

The statistics pass runs every model on the same batch and reads corresponding nodes of all of
them together; REPAIR runs the merged module on every calibration batch and corrects a layer
once its values over all batches are known. Both are `run_lockstep`: one fx interpreter per
run, all advanced one node at a time (model 0's node order), each value freed after its last
use, so no more is held than the runs' live values (a module that returned every feature at
once would hold them all, and run ~2× slower for the fresh memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from graphmerge.errors import DataError

__all__ = ["run_lockstep", "OverBudget", "nbytes"]


class OverBudget(Exception):
    """The live values of a lockstep run exceeded its memory bound."""


def nbytes(value: Any) -> int:
    """Bytes held by the tensors of a value (tuples and lists summed)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def run_lockstep(modules: Sequence[fx.GraphModule], inputs: Sequence[tuple[Any, ...]],
                 visit: Callable[[fx.Node, list[Any]], bool], *, max_bytes: int | None = None,
                 what: Callable[[int], str] = lambda i: f"run {i}") -> None:
    """Run `modules[i]` on `inputs[i]` for every i, one node at a time in step (no grad).

    The modules share one topology and node names (one module may appear several times).
    After each node, `visit(node of modules[0], [its value in every run])` is called; when it
    returns True (it changed tensors the node reads), the node is computed again.

    Raises:
        DataError: a run fails at a node (naming `what(i)`, the node and the cause).
        OverBudget: the live values exceed `max_bytes`.
    """
    graphs = [{n.name: n for n in m.graph.nodes} for m in modules]
    order = list(modules[0].graph.nodes)
    last = {n.name: i for i, m in enumerate(order) for n in m.all_input_nodes}
    runs = [fx.Interpreter(m, garbage_collect_values=False) for m in modules]
    held = sum(nbytes(x) for x in inputs)
    position = 0
    with torch.no_grad():
        for i, n0 in enumerate(order):
            if n0.op == "output":
                break
            if n0.op == "placeholder":
                for run, args, nodes in zip(runs, inputs, graphs):
                    run.env[nodes[n0.name]] = args[position] if position < len(args) else (
                        n0.args[0] if n0.args else None)  # an argument not given: its default
                position += 1
            else:
                _step(runs, graphs, n0, what)
            values = [run.env[nodes[n0.name]] for run, nodes in zip(runs, graphs)]
            if visit(n0, values):
                _step(runs, graphs, n0, what)
                values = [run.env[nodes[n0.name]] for run, nodes in zip(runs, graphs)]
            held += sum(nbytes(v) for v in values)
            for m in [*n0.all_input_nodes, *([] if n0.users else [n0])]:
                if last.get(m.name, i) == i:
                    for run, nodes in zip(runs, graphs):
                        held -= nbytes(run.env.pop(nodes[m.name], None))
            if max_bytes is not None and held > max_bytes:
                raise OverBudget(f"{held} bytes live after node {n0.name}")


def _step(runs: list[fx.Interpreter], graphs: list[dict[str, fx.Node]], n0: fx.Node,
          what: Callable[[int], str]) -> None:
    for k, (run, nodes) in enumerate(zip(runs, graphs)):
        n = nodes[n0.name]
        try:
            run.env[n] = run.run_node(n)
        except Exception as e:
            raise DataError(f"{what(k)} failed at node `{n.name}`: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e

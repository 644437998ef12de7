"""One graph for one computation: rewrites of a captured graph that keep its function exactly
but make two ways of writing it look alike to the analyses after capture.

**Feature lists.** A dense block may keep a list of features and concatenate the whole list
before each layer (`torch.cat([x, f1, f2], 1)`, then `torch.cat([x, f1, f2, f3], 1)`, …), or
concatenate each layer's output onto the last concatenation (x ← cat([x, f(x)])). The two are
equal, but only the second shows each layer as a unit of depth whose input is the previous
one's output (`graphmerge.graph.stages`). A concatenation whose parts are an earlier
concatenation's parts (along the same axis) plus one more is rewritten to read that earlier
concatenation: cat([a, b, c]) after cat([a, b]) becomes cat([cat([a, b]), c]).
"""

from __future__ import annotations

import torch.fx as fx

from graphmerge.graph.kinds import kind

__all__ = ["chain_concatenations"]


def _parts_and_dim(n: fx.Node) -> tuple[tuple[fx.Node, ...], object] | None:
    """A concatenation's parts (all nodes) and its axis argument as written, else None."""
    if n.op not in ("call_function", "call_method") or kind(n) != "cat" or not n.args:
        return None
    parts = n.args[0]
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    return tuple(parts), dim


def chain_concatenations(graph: fx.Graph, rewrite: bool = True) -> int:
    """Rewrite (in place; with `rewrite` False, only count) every concatenation that extends an
    earlier one by one part to read the earlier one (see the module docstring). Returns the
    number of concatenations rewritten (or to rewrite)."""
    seen: dict[tuple, fx.Node] = {}
    count = 0
    for n in graph.nodes:
        found = _parts_and_dim(n)
        if found is None:
            continue
        parts, dim = found
        if not isinstance(dim, int) or isinstance(dim, bool):
            continue
        earlier = seen.get((parts[:-1], dim)) if len(parts) > 1 else None
        if earlier is not None:
            count += 1
            if rewrite:
                new = [earlier, parts[-1]]
                n.args = (new, *n.args[1:]) if len(n.args) > 1 else (new,)
        seen.setdefault((parts, dim), n)
    return count

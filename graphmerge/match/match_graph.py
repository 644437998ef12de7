"""The match graph: a networkx graph of every model's fx nodes and spaces, with the pairs the
merge made, for a person to inspect (`graphmerge.io.match_graph` writes and reads it)."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx

from graphmerge.graph.capture import Traced
from graphmerge.match.pairing import op_key
from graphmerge.match.plans import SpacePlan

__all__ = ["build_match_graph", "describe_match_graph"]


def build_match_graph(traced: Sequence[Traced], plans: dict[int, SpacePlan], method: str
                      ) -> nx.Graph:
    """Nodes: every fx node and every space of every model (`m{i}/{node}`, `m{i}/space{k}`).
    Edges: `match` edges pair model 0's node/space with model i's; `member` edges tie a space to
    the nodes whose values live in it. Space-match edges carry the widths, the merged width,
    the matcher and the mean correlation of the merged pairs."""
    g = nx.Graph(method=method, models=len(traced))
    for i, t in enumerate(traced):
        for n in t.graph.nodes:
            shape = t.shapes.get(n.name)
            g.add_node(f"m{i}/{n.name}", kind="node", model=i, op=n.op,
                       target=op_key(n, t.graph_module)[1],
                       shape="" if shape is None else str(list(shape)))
        for s in t.space_table:
            g.add_node(f"m{i}/space{s.id}", kind="space", model=i, width=s.width,
                       frozen=s.frozen, why=s.why or "",
                       derived="" if s.derived is None else s.derived.kind)
            for a in {a.node.partition("#")[0] for a in s.members}:
                g.add_edge(f"m{i}/space{s.id}", f"m{i}/{a}", kind="member")
        if i:
            for n in t.graph.nodes:
                g.add_edge(f"m0/{n.name}", f"m{i}/{n.name}", kind="match")
            for s in t.space_table:
                p = plans.get(s.id)
                g.add_edge(f"m0/space{s.id}", f"m{i}/space{s.id}", kind="match",
                           widths=str([tt.space_table[s.id].width for tt in traced]),
                           merged_width=p.width if p else s.width,
                           matcher=p.matcher if p else "identity",
                           mean_correlation=float(p.mean_correlation) if p else float("nan"))
    return g


def describe_match_graph(g: nx.Graph) -> str:
    """A short text summary: models, nodes, spaces, and the merged spaces' correlations."""
    spaces = [(u, v, d) for u, v, d in g.edges(data=True)
              if d.get("kind") == "match" and "space" in u]
    lines = [f"match graph: {g.graph.get('models', '?')} models, method "
             f"{g.graph.get('method', '?')}, {g.number_of_nodes()} nodes, "
             f"{g.number_of_edges()} edges"]
    for u, v, d in sorted(spaces, key=lambda e: (e[0], e[1])):
        corr = d.get("mean_correlation", float("nan"))
        lines.append(f"  {u} ~ {v}: widths {d.get('widths')} -> {d.get('merged_width')} "
                     f"({d.get('matcher')}, mean corr {corr:.3f})")
    return "\n".join(lines)

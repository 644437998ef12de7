"""Pair the traced graphs of several models node by node and space by space, and describe the
pairing as a networkx match graph that a person can inspect (GraphML, JSON or DOT).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch.fx as fx

from .errors import ConfigError, MismatchError
from .trace import Traced

if TYPE_CHECKING:
    from .passes.plan import SpacePlan

__all__ = ["pair_models", "build_match_graph", "write_match_graph", "read_match_graph",
           "describe_match_graph"]


def _op_key(n: fx.Node, gm: fx.GraphModule) -> tuple[str, str]:
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
            ka, kb = _op_key(a, ref.graph_module), _op_key(b, t.graph_module)
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
            raise MismatchError(f"model {i} has {len(tb)} spaces, model 0 has {len(ta)}")
        for sa, sb in zip(ta, tb):
            pa = sorted((p.param, p.dim) for p in sa.params)
            pb = sorted((p.param, p.dim) for p in sb.params)
            if pa != pb or sa.frozen != sb.frozen or (sa.derived is None) != (sb.derived is None):
                raise MismatchError(
                    f"space {sa.id} differs between model 0 and model {i}: parameters "
                    f"{pa[:3]}… vs {pb[:3]}…")


def build_match_graph(traced: Sequence[Traced], plans: dict[int, "SpacePlan"], method: str
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
                       target=_op_key(n, t.graph_module)[1],
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


def write_match_graph(g: nx.Graph, path: str | os.PathLike) -> Path:
    """Write as GraphML (.graphml), node-link JSON (.json) or Graphviz DOT (.dot), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".graphml":
        text = "\n".join(nx.generate_graphml(g))
    elif suffix == ".json":
        text = json.dumps(nx.node_link_data(g, edges="edges"), indent=1, default=str)
    elif suffix == ".dot":
        text = _dot(g)
    else:
        raise ConfigError(f"unknown match-graph format {suffix!r}; use .graphml, .json or .dot")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_match_graph(path: str | os.PathLike) -> nx.Graph:
    path = Path(path)
    if path.suffix.lower() == ".json":
        return nx.node_link_graph(json.loads(path.read_text()), edges="edges")
    if path.suffix.lower() == ".graphml":
        return nx.read_graphml(path)
    raise ConfigError(f"can read match graphs from .json or .graphml, not {path.suffix!r}")


def _dot(g: nx.Graph) -> str:
    def q(x: Any) -> str:
        return '"' + str(x).replace('"', r'\"') + '"'

    lines = ["graph match {", "  node [shape=box, fontsize=9];"]
    for n, d in g.nodes(data=True):
        label = f"{n}\\n{d.get('target', '')} {d.get('shape', '')}" if d.get("kind") == "node" \
            else f"{n}\\nwidth {d.get('width')}{' frozen' if d.get('frozen') else ''}"
        shape = "ellipse" if d.get("kind") == "space" else "box"
        lines.append(f"  {q(n)} [label={q(label)}, shape={shape}];")
    for u, v, d in g.edges(data=True):
        style = "bold" if d.get("kind") == "match" else "dotted"
        label = f" label={q(d['merged_width'])}," if "merged_width" in d else ""
        lines.append(f"  {q(u)} -- {q(v)} [{label} style={style}];")
    lines.append("}")
    return "\n".join(lines)

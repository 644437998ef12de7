"""Match graph files: GraphML, node-link JSON or Graphviz DOT, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import networkx as nx

from graphmerge.errors import ConfigError, DataError, summarize
from graphmerge.io.atomic import as_path, write_text_atomic

__all__ = ["write_match_graph", "read_match_graph"]


def write_match_graph(g: nx.Graph, path: str | os.PathLike) -> Path:
    """Write as GraphML (.graphml), node-link JSON (.json) or Graphviz DOT (.dot), atomically.

    Raises:
        ConfigError: not a networkx graph, an unknown suffix, or a destination that cannot be
            written.
    """
    if not isinstance(g, nx.Graph):
        raise ConfigError(f"write_match_graph needs a networkx graph (MergeResult.match_graph), "
                          f"got {type(g).__name__}")
    path = as_path(path)
    suffix = path.suffix.lower()
    if suffix == ".graphml":
        text = "\n".join(nx.generate_graphml(g))
    elif suffix == ".json":
        text = json.dumps(nx.node_link_data(g, edges="edges"), indent=1, default=str)
    elif suffix == ".dot":
        text = _dot(g)
    else:
        raise ConfigError(f"unknown match-graph format {suffix!r}; use .graphml, .json or .dot")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: cannot create {path.parent} "
                          f"({e.strerror or e})") from e
    return write_text_atomic(path, text)


def read_match_graph(path: str | os.PathLike) -> nx.Graph:
    """Read a match graph that `write_match_graph` wrote (.json or .graphml).

    Raises:
        ConfigError: another suffix.
        DataError: the file is missing, unreadable, or not a match graph.
    """
    path = as_path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".graphml"):
        raise ConfigError(f"can read match graphs from .json or .graphml, not {path.suffix!r}")
    if not path.is_file():
        raise DataError(f"match graph file {path} does not exist")
    try:
        if suffix == ".json":
            return nx.node_link_graph(json.loads(path.read_text()), edges="edges")
        return nx.read_graphml(path)
    except Exception as e:
        raise DataError(f"{path} is not a match graph written by graphmerge "
                        f"({summarize(e)})") from e


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

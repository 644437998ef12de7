"""Plots of alignment results, written atomically as PNG files (matplotlib's Agg canvas)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphmerge.errors import ConfigError
from graphmerge.io.atomic import write_atomic
from graphmerge.match.align import check_cka, segments

if TYPE_CHECKING:
    import networkx as nx

    from graphmerge.graph.analyse import Analysed
    from graphmerge.graph.spaces import Space, SpaceTable

__all__ = ["plot_alignment", "plot_spaces", "plot_match_graph", "plot_space_graph"]

log = logging.getLogger(__name__)




def plot_alignment(stages: Sequence[tuple[np.ndarray, list[int]]], path: str | os.PathLike,
                   titles: Sequence[str] | None = None) -> Path:
    """Heatmaps of the CKA matrices of several stages with the chosen alignment, as a PNG.

    One panel per stage: CKA ``[m, n]`` (deep units on the y axis, shallow units on the x
    axis), each chosen pair (``l_k``, ``k``) marked with a white circle, each segment
    ``seg_k`` outlined.  Uses matplotlib's Agg canvas directly (no display, no pyplot state).
    The file is written to a temporary file next to ``path`` and moved into place with
    :func:`os.replace`.

    Args:
        stages: per stage, ``(cka [m, n], positions)``.
        path: the PNG file to write (parent directories are created).
        titles: one title per stage (default ``"stage i"``).

    Returns:
        The path written.

    Raises:
        ConfigError: no stages, or ``titles`` of the wrong length.
    """
    from matplotlib.patches import Rectangle

    if len(stages) == 0:
        raise ConfigError("plot_alignment got no stages; pass (cka, positions) per stage")
    if titles is None:
        titles = [f"stage {i}" for i in range(len(stages))]
    if len(titles) != len(stages):
        raise ConfigError(f"{len(titles)} titles for {len(stages)} stages; pass one per stage "
                          f"or none")
    k = len(stages)
    fig = _figure(3.2 * k + 0.5, 3.6)
    axes = fig.subplots(1, k, squeeze=False)[0]
    for ax, (cka, positions), title in zip(axes, stages, titles):
        c = check_cka(cka)
        m, n = c.shape
        if len(positions) != n:
            raise ConfigError(f"stage {title!r}: {len(positions)} positions for {n} shallow "
                              f"units; pass one per column")
        im = ax.imshow(c, cmap="viridis", aspect="auto", interpolation="nearest",
                       vmin=min(0.0, float(c.min())), vmax=max(1.0, float(c.max())))
        for j, seg in enumerate(segments(positions, m)):
            ax.add_patch(Rectangle((j - 0.5, seg[0] - 0.5), 1.0, len(seg), fill=False,
                                   edgecolor="red", linewidth=1.5))
        ax.scatter(range(n), positions, s=30, facecolors="white", edgecolors="black", zorder=3)
        ax.set_xlabel("shallow unit")
        ax.set_ylabel("deep unit")
        ax.set_xticks(range(n))
        ax.set_yticks(range(m))
        ax.set_title(str(title))
        fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")

    return _save(fig, path, f"alignment plot ({k} stages)")


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    log.info("wrote %s %s", what, path)
    return path


def _short(text: str, n: int = 26) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def plot_spaces(spaces: Sequence[dict], path: str | os.PathLike) -> Path:
    """Per merged space, one row: a histogram of the correlations of the merged groups (the
    mean pairwise correlation of each merged unit's members, on [-1, 1]) and, beside it, each
    model's width and the merged width.

    Args:
        spaces: `MergeResult.spaces` (keys space, widths, width, matcher, mean_correlation,
            correlations).
        path: the PNG file to write.
    """
    if not spaces:
        raise ConfigError("plot_spaces got no spaces; a merge with no merged space has no "
                          "histograms to draw")
    n = len(spaces)
    fig = _figure(8.0, 1.25 * n + 0.7)
    axes = fig.subplots(n, 2, squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    bins = np.linspace(-1.0, 1.0, 41)
    for (hist, bars), s in zip(axes, spaces):
        corr = np.asarray(s.get("correlations") or [], dtype=np.float64)
        corr = corr[np.isfinite(corr)]
        if corr.size:
            hist.hist(corr, bins=bins, color="#4c72b0")
            hist.axvline(float(corr.mean()), color="red", linewidth=1)
            label = f"{corr.size} merged units, mean {corr.mean():.2f}"
        else:
            label = ("heads matched as wholes" if s["width"] < sum(s["widths"])
                     else "no units merged")
            hist.text(0, 0.5, label, ha="center", va="center", fontsize=9, color="#555555",
                      transform=hist.get_xaxis_transform())
            hist.set_yticks([])
        hist.set_xlim(-1, 1)
        hist.set_title(f"space {s['space']} ({s['matcher']}): {label}", fontsize=9, loc="left")
        hist.tick_params(labelsize=8)
        names = [f"model {i}" for i in range(len(s["widths"]))] + ["merged"]
        values = [*s["widths"], s["width"]]
        colors = ["#8da0cb"] * len(s["widths"]) + ["#fc8d62"]
        bars.barh(range(len(values)), values, color=colors)
        bars.set_yticks(range(len(values)), names, fontsize=8)
        bars.invert_yaxis()
        bars.set_xlim(0, max(values) * 1.25)
        bars.tick_params(axis="x", labelsize=8)
        for k, v in enumerate(values):
            bars.text(v, k, f" {v}", va="center", fontsize=8)
    axes[-1][0].set_xlabel("correlation of the units merged into one", fontsize=9)
    axes[-1][1].set_xlabel("width", fontsize=9)
    return _save(fig, path, "space histograms")


def plot_match_graph(g: "nx.Graph", path: str | os.PathLike) -> Path:
    """The match graph as a picture: one column of spaces per model (in graph order, named by
    their first node, with their widths), matched spaces linked across columns (colour = mean
    correlation of the merged units, label = merged width), frozen spaces grey and hatched,
    with the reason at the right. Derived spaces (concatenations, flattens) follow their parts
    and are left out.

    Args:
        g: a match graph (`MergeResult.match_graph`, or `read_match_graph`).
        path: the PNG file to write.
    """
    import matplotlib as mpl

    order = {n: k for k, n in enumerate(g.nodes)}
    n_models = int(g.graph.get("models", 1))
    columns = _match_columns(g, order, n_models)
    rows = max((len(c) for c in columns), default=0)
    if not rows:
        raise ConfigError("the match graph has no spaces to draw")
    label_of = _match_labels(g, columns, order)
    box_w, gap = 3.0, 1.6
    fig = _figure(n_models * (box_w + gap) + 2.6, 0.36 * rows + 1.3)
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"]
    for i, col in enumerate(columns):
        x = i * (box_w + gap)
        _draw_match_column(ax, g, col, x, box_w, label_of, f"model {i}",
                           last=i == n_models - 1)
        if i > 0:
            _draw_match_links(ax, g, columns[i - 1], col, x, gap, cmap)
    width = n_models * (box_w + gap) - gap
    ax.set_xlim(-0.2, width + 2.6)
    ax.set_ylim(rows - 0.4, -1.3)
    ax.axis("off")
    sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, shrink=min(1.0, 6 / max(rows, 1)), pad=0.01,
                 label="mean correlation of merged units")
    ax.set_title(f"match graph: {n_models} models, {g.graph.get('method', '?')}; "
                 f"links: matched spaces (→ merged width, mean correlation), dotted: frozen (kept as model 0's)",
                 fontsize=9, loc="left")
    return _save(fig, path, "match graph picture")


def _match_columns(g: "nx.Graph", order: dict[str, int], n_models: int) -> list[list[str]]:
    """Per model, its base (not derived) spaces ordered by their first node in the graph."""
    columns: list[list[str]] = []
    for i in range(n_models):
        spaces = [n for n, d in g.nodes(data=True) if d.get("kind") == "space"
                  and int(d.get("model", 0)) == i and not d.get("derived")]

        def first(space: str) -> int:
            return min((order[m] for m in g.neighbors(space)
                        if g.nodes[m].get("kind") == "node"), default=order[space])

        columns.append(sorted(spaces, key=first))
    return columns


def _match_labels(g: "nx.Graph", columns: list[list[str]], order: dict[str, int]
                  ) -> dict[str, str]:
    """Each space's box label: its id, width and first node."""
    label_of = {}
    for col in columns:
        for s in col:
            members = sorted((m for m in g.neighbors(s) if g.nodes[m].get("kind") == "node"),
                             key=order.get)
            node = members[0].split("/", 1)[1] if members else ""
            label_of[s] = f"{s.split('/', 1)[1]} · {g.nodes[s].get('width')}  {_short(node, 18)}"
    return label_of


def _draw_match_column(ax, g: "nx.Graph", col: list[str], x: float, box_w: float,
                       label_of: dict[str, str], header: str, last: bool) -> None:
    """One model's column of boxes at ``x``; the last column also says why frozen spaces
    are frozen."""
    from matplotlib.patches import FancyBboxPatch

    ax.text(x + box_w / 2, -0.9, header, ha="center", fontsize=10, weight="bold")
    for r, s in enumerate(col):
        d = g.nodes[s]
        frozen = bool(d.get("frozen"))
        ax.add_patch(FancyBboxPatch((x, r - 0.35), box_w, 0.7, boxstyle="round,pad=0.02",
                                    facecolor="#dddddd" if frozen else "#e8f0fb",
                                    edgecolor="#777777" if frozen else "#4c72b0",
                                    hatch="///" if frozen else None, linewidth=0.8))
        ax.text(x + 0.08, r, label_of[s], va="center", fontsize=7.5, family="monospace")
        if frozen and last:
            ax.text(x + box_w + 0.15, r, _short(f"frozen: {d.get('why', '')}", 40),
                    va="center", fontsize=7, color="#555555")


def _draw_match_links(ax, g: "nx.Graph", prev: list[str], col: list[str], x: float,
                      gap: float, cmap) -> None:
    """The links from the previous column to the column at ``x``: matched spaces coloured by
    the mean correlation and labelled with the merged width, kept ones dotted."""
    rank = {s.split("/", 1)[1]: r for r, s in enumerate(prev)}
    for r, s in enumerate(col):
        sid = s.split("/", 1)[1]
        edge = g.get_edge_data(f"m0/{sid}", s) or {}
        if sid not in rank or edge.get("kind") != "match":
            continue
        corr = float(edge.get("mean_correlation", float("nan")))
        merged = edge.get("matcher") != "identity"
        x0, x1 = x - gap, x
        ax.plot([x0, x1], [rank[sid], r], color=cmap(max(corr, 0.0)) if merged and
                np.isfinite(corr) else "#999999", linewidth=2.2 if merged else 1.0,
                linestyle="-" if merged else ":")
        if merged:
            note = f"{corr:.2f}" if np.isfinite(corr) else edge.get("matcher", "")
            ax.text((x0 + x1) / 2, (rank[sid] + r) / 2 - 0.12,
                    f"→ {edge.get('merged_width')}  ({note})", ha="center",
                    va="bottom", fontsize=7)


def plot_space_graph(traced: "Analysed", path: str | os.PathLike, title: str = "") -> Path:
    """The space graph of one model: its spaces top to bottom in graph order (id, width, the
    first node in it; frozen spaces grey and hatched, with the reason), and one arc per layer
    from the space it reads to the space it writes (right: forward, left: back into an earlier
    space, e.g. a residual stream), labelled with the layer; dashed arcs join a derived space
    (concatenation, flatten) to its parts.

    Args:
        traced: a traced model (`graphmerge.trace`).
        path: the PNG file to write.
        title: shown above the picture.
    """
    table = traced.space_table
    order = {n.name: k for k, n in enumerate(traced.graph.nodes)}

    def first(space) -> int:
        return min((order.get(a.node.partition("#")[0], len(order)) for a in space.members),
                   default=len(order))

    spaces = sorted(table, key=first)
    row = {s.id: r for r, s in enumerate(spaces)}
    layers = _space_layers(table)
    n = len(spaces)
    fig = _figure(11.0, 0.42 * n + 1.2)
    ax = fig.add_subplot()
    box_w = 3.4
    span_x = 0.45
    _draw_space_boxes(ax, spaces, row, order, box_w)
    _draw_layer_arcs(ax, layers, row, box_w, span_x)
    _draw_derived_arcs(ax, spaces, row, box_w)
    reach = span_x * max((abs(row[a] - row[b]) for a, b in layers), default=1) + 3.5
    ax.set_xlim(-box_w / 2 - reach, box_w / 2 + reach)
    ax.set_ylim(n - 0.4, -1.0)
    ax.axis("off")
    ax.set_title(title or f"space graph: {n} spaces ({len(table.free)} free); arcs: layers "
                          f"(blue: forward, red: back into an earlier space), dashed: derived",
                 fontsize=9, loc="left")
    return _save(fig, path, "space graph")


def _space_layers(table: "SpaceTable") -> dict[tuple[int, int], list[str]]:
    """(space read, space written) -> the layers (parameter owners) that do it."""
    layers: dict[tuple[int, int], list[str]] = {}
    params = {a.param for s in table for a in s.params}
    for p in sorted(params):
        reads = {s.id for s in table for a in s.consumers if a.param == p}
        writes = {s.id for s in table for a in s.producers if a.param == p}
        for a in reads:
            for b in writes:
                if a != b:
                    layers.setdefault((a, b), []).append(p.rpartition(".")[0] or p)
    return layers


def _draw_space_boxes(ax, spaces: list["Space"], row: dict[int, int], order: dict[str, int],
                      box_w: float) -> None:
    """One box per space (id, width, kind, first node); frozen ones grey, with the reason."""
    from matplotlib.patches import FancyBboxPatch

    for s in spaces:
        r = row[s.id]
        node = next((a.node for a in sorted(s.members, key=lambda a: order.get(
            a.node.partition("#")[0], 0))), "")
        ax.add_patch(FancyBboxPatch((-box_w / 2, r - 0.35), box_w, 0.7,
                                    boxstyle="round,pad=0.02",
                                    facecolor="#dddddd" if s.frozen else "#e8f0fb",
                                    edgecolor="#777777" if s.frozen else "#4c72b0",
                                    hatch="///" if s.frozen else None, linewidth=0.8))
        kind = f" {s.derived.kind}" if s.derived else ""
        ax.text(-box_w / 2 + 0.08, r, f"{s.id} · {s.width}{kind}  {_short(node, 20)}",
                va="center", fontsize=7.5, family="monospace")
        if s.frozen:
            ax.text(-box_w / 2 - 0.1, r, _short(f"frozen: {s.why}", 44), va="center",
                    ha="right", fontsize=7, color="#555555")


def _draw_layer_arcs(ax, layers: dict[tuple[int, int], list[str]], row: dict[int, int],
                     box_w: float, span_x: float) -> None:
    """One labelled arc per layer: right and blue forward, left and red back up."""
    from matplotlib.patches import Arc

    for (a, b), names in sorted(layers.items(), key=lambda kv: (row[kv[0][0]], row[kv[0][1]])):
        ra, rb = row[a], row[b]
        lo, hi = sorted((ra, rb))
        height = hi - lo
        side = 1 if rb > ra else -1
        x = side * box_w / 2
        ax.add_patch(Arc((x, (lo + hi) / 2), span_x * height + 0.4, height,
                         theta1=-90 if side > 0 else 90, theta2=90 if side > 0 else 270,
                         color="#4c72b0" if side > 0 else "#c44e52", linewidth=1))
        label = _short(", ".join(dict.fromkeys(names)), 30)
        ax.text(x + side * (span_x * height + 0.4) / 2 + side * 0.05, (lo + hi) / 2, label,
                va="center", ha="left" if side > 0 else "right", fontsize=6.5,
                color="#4c72b0" if side > 0 else "#c44e52", zorder=5,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})


def _draw_derived_arcs(ax, spaces: list["Space"], row: dict[int, int], box_w: float) -> None:
    """Dashed arcs on the left from each derived space to its parts."""
    from matplotlib.patches import Arc

    for s in spaces:
        for p in (s.derived.parts if s.derived else ()):
            if p is None or p not in row:
                continue
            lo, hi = sorted((row[p], row[s.id]))
            ax.add_patch(Arc((-box_w / 2, (lo + hi) / 2), 0.3 * (hi - lo) + 0.3, hi - lo,
                             theta1=90, theta2=270, color="#777777", linestyle="--",
                             linewidth=0.8))

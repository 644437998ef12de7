"""Plots of alignment results, written atomically as PNG files (matplotlib's Agg canvas)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphmerge.errors import ConfigError
from graphmerge.io.atomic import write_atomic
from graphmerge.match.align import check_cka, segments

__all__ = ["plot_alignment"]

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if len(stages) == 0:
        raise ConfigError("plot_alignment got no stages; pass (cka, positions) per stage")
    if titles is None:
        titles = [f"stage {i}" for i in range(len(stages))]
    if len(titles) != len(stages):
        raise ConfigError(f"{len(titles)} titles for {len(stages)} stages; pass one per stage "
                          f"or none")
    k = len(stages)
    fig = Figure(figsize=(3.2 * k + 0.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
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

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    log.info("wrote alignment plot %s (%d stages)", path, k)
    return path

"""Streamed feature statistics: one pass over calibration data, all models on the same batch.

For every space to be matched, the features of all models (the activations the space's consumers
read, each spatial or token position a sample) are concatenated along the unit axis and streamed
into Σx [d] and Σxxᵀ [d, d] in float64, d = Σ_i d_i. Under `torch.distributed` the sums are
all-reduced, so several processes give the result of one.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from tqdm.auto import tqdm

from graphmerge.errors import DataError, GraphmergeError
from graphmerge.graph.axes import NodeAxis
from graphmerge.graph.capture import set_eval
from graphmerge.inputs import split_batch
from graphmerge.match.matchers import correlation_from_moments

__all__ = ["SpaceStats", "feature_module", "collect_stats", "unit_sums"]

log = logging.getLogger(__name__)


#: the largest amount by which unequal means or spreads lower a correlation (a tie-breaker)
TIE_BREAK = 1e-6


@dataclass
class SpaceStats:
    """Streamed moments of one space's concatenated features. Memory O(d²)."""

    widths: list[int]
    sum_x: np.ndarray = field(init=False)
    sum_xx: np.ndarray = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        d = sum(self.widths)
        self.sum_x = np.zeros(d)
        self.sum_xx = np.zeros((d, d))

    def add(self, x: torch.Tensor) -> None:
        """x: [n, d] features of all models side by side."""
        x = x.detach().double()
        self.sum_x += x.sum(0).numpy()
        self.sum_xx += (x.T @ x).numpy()
        self.count += x.shape[0]

    def correlation(self) -> np.ndarray:
        """[d, d] correlation; a constant unit (relative to the scale of its model's units)
        correlates 1 with constant units of the same value and 0 with everything else
        (`correlation_from_moments`). Exact ties (units that are affine functions of each
        other on the data, e.g. in a rank-deficient layer) are broken toward units of equal
        mean and spread, by at most `TIE_BREAK`."""
        corr = correlation_from_moments(self.sum_x, self.sum_xx, self.count,
                                        widths=self.widths)
        mean = self.sum_x / self.count
        std = np.sqrt(np.clip(np.diag(self.sum_xx) / self.count - mean ** 2, 0.0, None))
        gap = np.abs(mean[:, None] - mean[None, :]) + np.abs(std[:, None] - std[None, :])
        scale = np.abs(mean)[:, None] + np.abs(mean)[None, :] + std[:, None] + std[None, :]
        return corr - TIE_BREAK * gap / np.maximum(scale, 1e-12)


def feature_module(gm: fx.GraphModule, nodes: Sequence[str]) -> fx.GraphModule:
    """A copy of `gm` that returns (output, {node name: value}) for the given nodes."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    by_name = {n.name: env[n] for n in gm.graph.nodes if n in env}
    missing = [n for n in nodes if n.partition("#")[0] not in by_name]
    if missing:
        raise GraphmergeError(f"nodes {missing} are not in the graph")
    feats = {}
    for name in nodes:
        base, _, piece = name.partition("#")
        value = by_name[base]
        feats[name] = graph.call_function(_piece, (value, int(piece))) if piece else value
    graph.output((out, feats))
    return fx.GraphModule(gm, graph)


def _piece(value: Any, k: int) -> Any:
    return value[k]


def _features(value: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., d, ...] -> [n, d] with every other position a sample."""
    return value.movedim(dim, -1).reshape(-1, value.shape[dim])


def collect_stats(
    modules: Sequence[fx.GraphModule],
    reads: dict[Any, list[list[NodeAxis]]],
    batches: Iterable[Any],
    n_inputs: int,
    *,
    max_rows: int = 8192,
    progress: bool = True,
) -> dict[Any, SpaceStats]:
    """Stream Σx and Σxxᵀ of every space's features over the calibration batches.

    Args:
        modules: one traced GraphModule per model (same topology), run in eval mode.
        reads: space key -> per model, the node axes to read (same node names in every model).
        batches: calibration batches (see `split_batch`).
        n_inputs: number of model inputs at the front of each batch.
        max_rows: at most this many sample rows per space and batch; larger feature maps are
            subsampled with the same rows in every model.

    Raises:
        DataError: no batches, non-finite inputs or activations (naming model and node).
    """
    names = sorted({a.node for per_model in reads.values() for axes in per_model for a in axes})
    runners = [set_eval(feature_module(gm, names)) for gm in modules]
    stats: dict[Any, SpaceStats] = {}
    n_batches = 0
    bar = tqdm(batches, desc="calibration statistics", unit="batch", disable=not progress,
               leave=False)
    with torch.no_grad():
        for b, batch in enumerate(bar):
            inputs = split_batch(batch, n_inputs)
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(
                        x).all():
                    raise DataError(f"calibration batch {b} contains NaN or infinite values")
            results = []
            for i, run in enumerate(runners):
                try:
                    results.append(run(*inputs))
                except Exception as e:
                    raise DataError(
                        f"model {i} failed on calibration batch {b} (input shapes "
                        f"{[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)]}): "
                        f"{type(e).__name__}: {e}. Calibration batches must have the shape of "
                        f"the example inputs (any batch size).") from e
            for i, (_, feats) in enumerate(results):
                for name, v in feats.items():
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(
                            v).all():
                        raise DataError(
                            f"model {i} produces NaN/inf at node `{name}` on calibration batch "
                            f"{b}; check the model's weights and the input scaling")
            for key, per_model in reads.items():
                rows = []
                for axes_i, (_, feats) in zip(per_model, results):
                    rows.append(torch.cat([_features(feats[a.node], a.dim) for a in axes_i]))
                n = rows[0].shape[0]
                if n > max_rows:
                    g = torch.Generator().manual_seed(zlib.crc32(f"{key}/{b}".encode()))
                    idx = torch.randperm(n, generator=g)[:max_rows]
                    rows = [r[idx] for r in rows]
                if key not in stats:
                    stats[key] = SpaceStats([r.shape[1] for r in rows])
                stats[key].add(torch.cat(rows, dim=1))
            n_batches += 1
    if n_batches == 0:
        raise DataError("the calibration data is empty: pass at least one batch "
                        "(e.g. a DataLoader over a few hundred training inputs)")
    _all_reduce(stats)
    log.debug("collected statistics of %d spaces over %d batches", len(stats), n_batches)
    return stats


def unit_sums(module: fx.GraphModule, points: dict[str, int], batches: Iterable[Any],
              n_inputs: int, *, progress: bool = True,
              desc: str = "unit statistics") -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per unit Σx and Σx² (float64) and the sample count at each node {name: unit axis}, every
    other position a sample: one pass of `module` over the batches."""
    run = set_eval(feature_module(module, sorted(points)))
    sums: dict[str, list] = {}
    with torch.no_grad():
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
            _, feats = run(*split_batch(batch, n_inputs))
            for name, dim in points.items():
                x = _features(feats[name], dim).double()
                entry = sums.setdefault(name, [0.0, 0.0, 0])
                entry[0] = entry[0] + x.sum(0).numpy()
                entry[1] = entry[1] + (x * x).sum(0).numpy()
                entry[2] += x.shape[0]
    return {name: (np.asarray(a), np.asarray(b), n) for name, (a, b, n) in sums.items()}


def _all_reduce(stats: dict[Any, SpaceStats]) -> None:
    """Sum the moments over processes when torch.distributed is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    for key in sorted(stats, key=str):
        s = stats[key]
        for arr in (s.sum_x, s.sum_xx):
            t = torch.from_numpy(arr)
            dist.all_reduce(t)
            arr[...] = t.numpy()
        c = torch.tensor([s.count], dtype=torch.float64)
        dist.all_reduce(c)
        s.count = int(c.item())

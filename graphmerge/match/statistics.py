"""Streamed feature statistics: one pass over calibration data, all models on the same batch.

For every space to be matched, the features of all models (the activations the space's consumers
read, each spatial or token position a sample) are concatenated along the unit axis and streamed
into Σx [d] and Σxxᵀ [d, d] (float64; float32 for spaces of `FLOAT32_UNITS` units and more,
shifted by the first batch's means), d = Σ_i d_i. Under `torch.distributed` the sums are
all-reduced, so several processes give the result of one.
"""

from __future__ import annotations

import logging
import mmap
import zlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphmerge.calibration import all_reduce, distributed, with_progress
from graphmerge.errors import ConfigError, DataError, GraphmergeError
from graphmerge.graph.axes import NodeAxis
from graphmerge.graph.capture import set_eval
from graphmerge.graph.lockstep import run_lockstep
from graphmerge.match.matchers import (_transposed, correlation_from_moments,
                                       correlation_in_place)

__all__ = ["SpaceStats", "UnitStats", "moments", "StreamedStats", "feature_module",
           "collect_stats", "unit_sums", "statistics_bytes"]

log = logging.getLogger(__name__)


#: the largest amount by which unequal means or spreads lower a correlation (a tie-breaker)
TIE_BREAK = 1e-6


#: spaces of at least this many units (over all models) accumulate Σxxᵀ in float32: half the
#: memory, and each batch's products added by the matrix product itself (a float64 sum costs a
#: second pass over d² per batch, several times the product on a CPU). The sums are shifted
#: by the first batch's means, so float32 rounds the centred moments, not the raw ones.
FLOAT32_UNITS = 4096

#: a model's own block of Σxxᵀ is symmetric: from twice this many units on, it is written in
#: chunks of about this many, only those on and above its diagonal (`SpaceStats._pieces`)
CHUNK = 1024


def sums_dtype(width: int) -> torch.dtype:
    """The dtype of Σxxᵀ for a space of `width` units over all models."""
    return torch.float32 if width >= FLOAT32_UNITS else torch.float64


@dataclass
class SpaceStats:
    """Streamed moments of one space's concatenated features, kept shifted by the first
    batch's means c: Σ(x - c) [d] in float64, Σ(x - c)(x - c)ᵀ [d, d] in `sums_dtype(d)`.
    `sums()` gives the moments of x itself, in float64. While streaming, only the blocks of
    Σxxᵀ on and above the diagonal (`_pieces`: model i against model j > i, and the chunks of
    each model's own block on and above its diagonal) are written, and on the CPU
    the blocks below take no memory until they are mirrored (`_mirror`, when the whole matrix
    is read)."""

    widths: list[int]
    count: int = 0
    _sx: torch.Tensor | None = field(default=None, repr=False)
    _sxx: torch.Tensor | None = field(default=None, repr=False)
    _mirrored: bool = field(default=True, repr=False)  # the blocks below hold their values
    work: dict | None = field(default=None, repr=False, compare=False)  # products' scratch
    _shift: torch.Tensor | None = field(default=None, repr=False)  # c, float64; None: unshifted

    def add(self, rows: Sequence[torch.Tensor]) -> None:
        """rows: per model, its [n, d_i] features of the same n samples. Each batch is centred
        on its own means m (no cancellation in its products), and Σ(x - c)(x - c)ᵀ gets its
        centred products plus n (m - c)(m - c)ᵀ. The products are taken in the features'
        dtype (float32 or wider) block by block (`_pieces`: only those on and above the
        diagonal; those below are their transposes, `_mirror`): added by the product itself
        where the sums have the features' dtype, else through `work` (scratch shared between
        calls and spaces) or a fresh tensor."""
        rows = [r.detach() if r.is_floating_point() and r.element_size() >= 4
                else r.detach().float() for r in rows]
        n = rows[0].shape[0]
        means = [r.mean(0, keepdim=True) for r in rows]
        if self._sx is None:
            d = sum(self.widths)
            self._shift = torch.cat(means, dim=1).reshape(-1).double()
            self._sx = torch.zeros(d, dtype=torch.float64, device=rows[0].device)
            self._sxx = _zeros(d, rows[0].device, sums_dtype(d))
        moved = torch.cat(means, dim=1).reshape(-1).double() - self._shift  # m - c
        centred = torch.cat([r - m for r, m in zip(rows, means)], dim=1)
        step = moved.to(self._sxx.dtype)
        for r, c in self._pieces():
            block, left, right = self._sxx[r, c], centred[:, r], centred[:, c]
            if block.dtype == left.dtype:
                block.addmm_(left.T, right)
            else:
                product = _scratch(self.work, (left.shape[1], right.shape[1]), left)
                block += torch.matmul(left.T, right, out=product)
            block.addr_(step[r], step[c], alpha=n)
        self._mirrored = len(self._cuts()) == 2
        self._sx += n * moved
        self.count += n

    def _cuts(self) -> np.ndarray:
        """The bounds of the blocks the sums are written in: each model's units, in chunks of
        about `CHUNK` when it has at least twice as many."""
        cuts = [0]
        for w in self.widths:
            k, base = max(1, w // CHUNK), cuts[-1]
            cuts.extend(base + int(x) for x in np.linspace(0, w, k + 1).round()[1:])
        return np.array(cuts)

    def _pieces(self, every: bool = False) -> Iterator[tuple[slice, slice]]:
        """(rows, columns) of the blocks a batch is added to: each pair of models (i < j)
        whole, and each model's own symmetric block by its chunks on and above the diagonal
        (about half the products); `every`: the whole matrix, one piece."""
        if every:
            yield slice(None), slice(None)
            return
        at, cuts = np.cumsum([0, *self.widths]), self._cuts()
        for i in range(len(self.widths)):
            own = [k for k in range(len(cuts) - 1) if at[i] <= cuts[k] < at[i + 1]]
            for p in own:
                for q in own[own.index(p):]:
                    yield slice(cuts[p], cuts[p + 1]), slice(cuts[q], cuts[q + 1])
            for j in range(i + 1, len(self.widths)):
                yield slice(at[i], at[i + 1]), slice(at[j], at[j + 1])

    def sums(self, pool: dict | None = None, whole: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σx [d], Σxxᵀ [d, d]) of the features themselves, float64 (`whole`: mirrored; else
        only the blocks on and above the diagonal hold them, what a correlation reads). The
        shifted sums are converted once, in place of themselves: Σxxᵀ += c sᵀ + s cᵀ + n c cᵀ
        for s = Σ(x - c) (float64 holds the raw moments that float32 would not); float32 ones
        into a float64 buffer kept in `pool` (reused from space to space, and grown as needed:
        its memory is not mapped afresh), else into a new tensor."""
        if self._sxx is None:
            d, on = sum(self.widths), self._sx.device if self._sx is not None else None
            return (torch.zeros(d, dtype=torch.float64, device=on),
                    torch.zeros(d, d, dtype=torch.float64, device=on))
        if self._shift is not None:
            self._sxx = self._widened(pool)
            c, s = self._shift, self._sx
            u = s + (self.count / 2) * c  # c uᵀ + u cᵀ = c sᵀ + s cᵀ + n c cᵀ
            for r, k in self._pieces(every=self._mirrored):
                self._sxx[r, k].addr_(c[r], u[k]).addr_(u[r], c[k])
            self._sx = s + self.count * c
            self._shift = None
        if whole:
            self._mirror()
        return self._sx, self._sxx

    def _widened(self, pool: dict | None) -> torch.Tensor:
        """Σxxᵀ in float64: itself when it is, else its written blocks copied into the pool's
        buffer (or a new tensor); the blocks below are mirrored when the whole is read."""
        if self._sxx.dtype == torch.float64:
            return self._sxx
        d = self._sxx.shape[0]
        out = _scratch(pool, (d, d), self._sxx.new_empty(0, dtype=torch.float64))
        out = torch.empty(d, d, dtype=torch.float64, device=self._sxx.device) if out is None \
            else out
        cuts = self._cuts()
        for p in range(len(cuts) - 1):
            rows = slice(cuts[p], cuts[p + 1])
            start = cuts[p] if not self._mirrored else 0
            out[rows, start:].copy_(self._sxx[rows, start:])
        return out

    def _mirror(self) -> None:
        """Each block below the diagonal becomes the transpose of its block above (exactly the
        sums it would have streamed: the same terms in the same order)."""
        if self._mirrored or self._sxx is None:
            return
        at = self._cuts()
        for i in range(len(at) - 1):
            for j in range(i + 1, len(at) - 1):
                _transposed(self._sxx[at[i]:at[i + 1]], at[j], at[j + 1], at[i + 1] - at[i],
                            self._sxx[at[j]:at[j + 1], at[i]:at[i + 1]])
        self._mirrored = True

    @property
    def sum_x(self) -> np.ndarray:
        return self.sums()[0].cpu().numpy()

    @property
    def sum_xx(self) -> np.ndarray:
        return self.sums()[1].cpu().numpy()

    def all_reduce(self) -> None:
        if distributed()[1] > 1 and self._sxx is not None:
            self.sums()  # each process has its own shift: the raw moments add up
        count = torch.tensor([float(self.count)], dtype=torch.float64,
                             device=self._sx.device if self._sx is not None else None)
        all_reduce(self._sx, self._sxx, count)
        self.count = int(count.item())

    def correlation(self, consume: bool = False, pool: dict | None = None) -> torch.Tensor:
        """[d, d] float64 correlation, on the device of the sums (one new d x d tensor, built
        by blocks of rows; with `consume`, written over Σxxᵀ instead, which these statistics
        then no longer hold: no second d x d tensor); a constant unit (relative to the scale
        of its model's units) correlates 1 with constant units of the same value and 0 with
        everything else (`correlation_from_moments`). Exact ties (units that are affine
        functions of each other on the data, e.g. in a rank-deficient layer) are broken toward
        units of equal mean and spread, by at most `TIE_BREAK`. Exactly symmetric. `pool`: as
        in `sums`, where float32 sums are widened (and, with `consume`, the result written)."""
        sx, sxx = self.sums(pool, whole=False)  # a correlation reads the upper triangle
        if not consume:
            return correlation_from_moments(sx, sxx, self.count, widths=self.widths,
                                            tie_break=TIE_BREAK)
        self._sxx = None
        return correlation_in_place(sx, sxx, self.count, widths=self.widths,
                                    tie_break=TIE_BREAK)


def moments(sum_x: np.ndarray, sum_xx: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit mean and std from streamed sums."""
    mean = sum_x / max(count, 1)
    return mean, np.sqrt(np.clip(sum_xx / max(count, 1) - mean ** 2, 0.0, None))


@dataclass
class UnitStats:
    """Streamed per-unit Σx and Σx² (float64) of one node's units."""

    sum_x: torch.Tensor | float = 0.0
    sum_xx: torch.Tensor | float = 0.0
    count: int = 0

    def add(self, value: torch.Tensor, dim: int) -> None:
        """The units on axis `dim` of `value`, every other position a sample. The batch's
        mean and centred second moment are taken in the value's dtype (no cancellation), and
        added to the float64 sums."""
        value = value.detach()
        dim = dim % value.dim()
        others = [d for d in range(value.dim()) if d != dim]
        n = value.numel() // max(value.shape[dim], 1)
        mean = value.mean(others, keepdim=True)
        centred = value - mean
        m2 = (centred * centred).sum(others).double()
        mean = mean.reshape(-1).double()
        self.sum_x = self.sum_x + n * mean
        self.sum_xx = self.sum_xx + m2 + n * mean * mean
        self.count += n

    def all_reduce(self) -> None:
        on = self.sum_x.device if isinstance(self.sum_x, torch.Tensor) else None
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=on)
        all_reduce(self.sum_x, self.sum_xx, count)
        self.count = int(count.item())

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-unit mean and std."""
        return moments(np.asarray(torch.as_tensor(self.sum_x).cpu()),
                       np.asarray(torch.as_tensor(self.sum_xx).cpu()), self.count)


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


def unit_rows(value: torch.Tensor, dim: int, rows: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[..., d, ...] -> [n, d] with every other position a sample (only the positions `rows`
    of them, in that order, when given: nothing else is copied)."""
    moved = value.movedim(dim, -1)
    if rows is None:
        return moved.reshape(-1, value.shape[dim])
    return moved[torch.unravel_index(rows.to(value.device), moved.shape[:-1])]


def collect_stats(
    modules: Sequence[fx.GraphModule],
    reads: dict[Any, list[list[NodeAxis]]],
    calibration: Iterable[tuple[Any, ...]],
    *,
    units: dict[str, int] | None = None,
    widths: dict[Any, int] | None = None,
    pooled: dict[tuple[str, int], tuple[int, ...]] | None = None,
    max_rows: int = 8192,
    max_memory: int | None = None,
    progress: bool = True,
) -> tuple[StreamedStats, list[dict[str, UnitStats]]]:
    """Stream Σx and Σxxᵀ of every space's features over the calibration data, and per-unit
    sums at `units`, for every model at once: each model runs once per batch.

    Args:
        modules: one traced GraphModule per model (same topology), run in eval mode.
        reads: space key -> per model, the node axes to read (same node names in every model).
        calibration: model inputs per batch (a `graphmerge.calibration.Calibration`).
        units: {node name: unit axis} whose per-unit sums are wanted in every model (REPAIR's
            targets); collected in the first pass.
        widths: space key -> d = Σ_i d_i, needed with `max_memory`.
        pooled: (node, dim) of a read -> axes its value is averaged over first (other
            transformable axes, whose positions differ between models).
        max_rows: at most this many sample rows per space and batch, shared equally by its
            reads; larger feature maps are subsampled with the same rows in every model.
        max_memory: bound in bytes on the space statistics one pass measures
            (`statistics_bytes`: 8·d² or 4·d² per space of d = Σ_i d_i units); more spaces
            are measured over several passes, each space exactly as in one pass, a pass when
            its spaces are first read (a reader that releases what it used holds one pass's).

    Returns:
        the space statistics (`StreamedStats`: the first pass's measured here, the others'
        when read), and per model {node: UnitStats}.

    Raises:
        DataError: no batches, non-finite activations (naming model and node; for a later
            pass's spaces, when they are read).
        ConfigError: one space alone needs more than max_memory.
    """
    groups = _groups(sorted(reads, key=str), widths or {}, max_memory)
    for m in modules:
        set_eval(m)
    sums: list[dict[str, UnitStats]] = [{name: UnitStats() for name in units or {}}
                                        for _ in modules]
    run = _Pass(modules, reads, calibration, pooled or {}, max_rows, progress, len(groups))
    first = run(0, groups[0], units or {}, sums)
    for u in (u for own in sums for u in own.values()):
        u.all_reduce()
    _check_finite(first, reads, sums)
    stats = StreamedStats(groups, first, lambda g: _checked(run(g, groups[g]), reads))
    log.debug("collected statistics of %d spaces; %d more pass(es) as they are read",
              len(first), len(groups) - 1)
    return stats, sums


def _checked(stats: dict[Any, SpaceStats], reads: dict[Any, list[list[NodeAxis]]]
             ) -> dict[Any, SpaceStats]:
    _check_finite(stats, reads, [])
    return stats


@dataclass
class _Pass:
    """One pass of every model over the calibration data, streaming the features of a group
    of spaces (and, in the first, the per-unit sums at `units`) into their statistics."""

    modules: Sequence[fx.GraphModule]
    reads: dict[Any, list[list[NodeAxis]]]
    calibration: Iterable[tuple[Any, ...]]
    pooled: dict[tuple[str, int], tuple[int, ...]]
    max_rows: int
    progress: bool
    passes: int
    work: dict = field(default_factory=dict)  # the products' scratch, shared by every space

    def __call__(self, g: int, keys: list[Any], units: dict[str, int] | None = None,
                 sums: list[dict[str, UnitStats]] | None = None) -> dict[Any, SpaceStats]:
        stats: dict[Any, SpaceStats] = {}
        taps: dict[str, list[tuple[Any, int, NodeAxis]]] = {}  # node -> (space, read, axis)
        for key in keys:
            for r, axis in enumerate(self.reads[key][0]):
                taps.setdefault(axis.node.partition("#")[0], []).append((key, r, axis))
        wanted = units or {}
        desc = "calibration statistics" + (f" ({g + 1}/{self.passes})" if self.passes > 1
                                           else "")
        for b, inputs in with_progress(self.calibration, desc, self.progress):
            def visit(n: fx.Node, values: list[Any]) -> bool:
                for key, r, axis in taps.get(n.name, ()):
                    self._add(stats, key, r, axis, b, values)
                if n.name in wanted:
                    for own, v in zip(sums, values):
                        own[n.name].add(v, wanted[n.name])
                return False

            run_lockstep(self.modules, [inputs] * len(self.modules), visit,
                         what=lambda i, b=b: f"model {i} on calibration batch {b}")
        for s in stats.values():
            s.all_reduce()
        return stats

    def _add(self, stats: dict[Any, SpaceStats], key: Any, r: int, axis: NodeAxis, b: int,
             values: list[Any]) -> None:
        """Read `r` of space `key` on batch `b` (every model's value of its node)."""
        piece = axis.node.partition("#")[2]
        per_model = [v[int(piece)] if piece else v for v in values]
        over = self.pooled.get((axis.node, axis.dim))
        if over:
            per_model = [v.mean(over, keepdim=True) for v in per_model]
        gen = torch.Generator().manual_seed(zlib.crc32(f"{key}/{r}/{b}".encode()))
        quota = max(1, self.max_rows // len(self.reads[key][0]))  # rows per read
        idx = _subsample(per_model[0], axis.dim, quota, gen)
        rows = [unit_rows(v, axis.dim, idx) for v in per_model]
        if key not in stats:
            stats[key] = SpaceStats([x.shape[1] for x in rows], work=self.work)
        stats[key].add(rows)


class StreamedStats(MutableMapping):
    """The statistics of every space, by space key, measured a group at a time (`max_memory`):
    the first group's by `collect_stats` itself, each later group's by one pass over the
    calibration data when the first of its spaces is read (iteration runs the groups in
    order). `del stats[key]` releases a space's statistics once used, so a reader that
    releases what it has used holds about one group's at a time. `counts`: every measured
    space's sample count, kept after release."""

    def __init__(self, groups: list[list[Any]], first: dict[Any, SpaceStats],
                 collect: Callable[[int], dict[Any, SpaceStats]]):
        self._groups, self._collect = groups, collect
        self._of = {k: g for g, keys in enumerate(groups) for k in keys}
        self._held: dict[Any, SpaceStats] = {}
        self._measured: list[list[Any]] = [[] for _ in groups]  # in the order measured
        self._ran: set[int] = set()
        self.counts: dict[Any, int] = {}
        self._keep(0, first)

    def _keep(self, g: int, stats: dict[Any, SpaceStats]) -> None:
        self._ran.add(g)
        self._held.update(stats)
        self._measured[g] = list(stats)
        self.counts.update({k: s.count for k, s in stats.items()})

    def _run(self, g: int) -> None:
        if g not in self._ran:
            self._keep(g, self._collect(g))

    def __getitem__(self, key: Any) -> SpaceStats:
        if key not in self._held:
            if key not in self._of:
                raise KeyError(key)
            self._run(self._of[key])
            if key not in self._held:
                raise KeyError(key)  # released, or never reached by the data
        return self._held[key]

    def __setitem__(self, key: Any, value: SpaceStats) -> None:
        self[key]  # noqa: B018 - measured first: only a measured space is replaced
        self._held[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._held[key]

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        for g in range(len(self._groups)):
            self._run(g)
            yield from (k for k in self._measured[g] if k in self._held)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def planned(self) -> set[Any]:
        """Every space key read (measured or not yet), without running a pass."""
        return set(self._of)


def _subsample(value: torch.Tensor, dim: int, max_rows: int,
               gen: torch.Generator) -> torch.Tensor | None:
    """At most `max_rows` random sample positions of `value` (None: all of them)."""
    n = value.numel() // max(value.shape[dim], 1)
    if n <= max_rows:
        return None
    return torch.randperm(n, generator=gen)[:max_rows]


def _check_finite(stats: dict[Any, SpaceStats], reads: dict[Any, list[list[NodeAxis]]],
                  sums: list[dict[str, UnitStats]]) -> None:
    """NaN/inf in the features, found in their sums: named by model and node."""
    for key, s in stats.items():  # a unit's NaN/inf shows in its Σx² (O(d), no d² read)
        bad = ~torch.isfinite(s._sx) | ~torch.isfinite(s._sxx.diagonal())
        if bool(bad.any()):
            model = int(np.searchsorted(np.cumsum(s.widths), int(bad.nonzero()[0, 0]),
                                        side="right"))
            nodes = ", ".join(f"`{a.node}`" for a in reads[key][model])
            raise DataError(f"model {model} produces NaN/inf at node {nodes} on the "
                            f"calibration data; check the model's weights and the input "
                            f"scaling")
    for i, own in enumerate(sums):
        for name, u in own.items():
            if not bool(torch.isfinite(torch.as_tensor(u.sum_xx)).all()):
                raise DataError(f"model {i} produces NaN/inf at node `{name}` on the "
                                f"calibration data; check the model's weights and the input "
                                f"scaling")


def _scratch(work: dict | None, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
    """An uninitialised [shape] tensor of `like`'s dtype and device, a view of one buffer in
    `work` grown as needed (None without `work`: matmul allocates its result)."""
    if work is None:
        return None
    key = (like.dtype, like.device)
    size = shape[0] * shape[1]
    if key not in work or work[key].numel() < size:
        work[key] = torch.empty(size, dtype=like.dtype, device=like.device)
    return work[key][:size].view(shape)


def _zeros(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A [d, d] of zeros; on the CPU an anonymous mapping, whose pages take memory only once
    written."""
    if device.type != "cpu" or d * d < 1 << 17:
        return torch.zeros(d, d, dtype=dtype, device=device)
    size = d * d * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).reshape(d, d)  # (no copy)


def statistics_bytes(width: int) -> int:
    """Memory of one space's statistics while they are streamed: Σxxᵀ (`sums_dtype`) and Σx
    for d = Σ_i d_i units."""
    return sums_dtype(width).itemsize * width * width + 8 * width


def _groups(keys: list[Any], widths: dict[Any, int], max_memory: int | None
            ) -> list[list[Any]]:
    """The spaces in passes whose statistics fit in `max_memory` together (one pass without
    a bound), in a fixed order."""
    if max_memory is None:
        return [keys]
    sizes = {k: statistics_bytes(widths[k]) for k in keys}
    too_big = [k for k in keys if sizes[k] > max_memory]
    if too_big:
        raise ConfigError(f"max_memory={max_memory:,} bytes is less than the statistics of "
                          f"space {too_big[0]} alone ({sizes[too_big[0]]:,} bytes: Σxxᵀ and Σx "
                          f"for its d = {widths[too_big[0]]} units over all models); raise "
                          f"max_memory")
    groups: list[list[Any]] = [[]]
    used = 0
    for k in keys:
        if groups[-1] and used + sizes[k] > max_memory:
            groups.append([])
            used = 0
        groups[-1].append(k)
        used += sizes[k]
    return groups


def unit_sums(module: fx.GraphModule, points: dict[str, int],
              calibration: Iterable[tuple[Any, ...]], *, progress: bool = True,
              desc: str = "unit statistics") -> dict[str, UnitStats]:
    """Per unit Σx and Σx² (float64) at each node {name: unit axis}, every other position a
    sample: one pass of `module` over the calibration data (all-reduced across processes)."""
    run = set_eval(feature_module(module, sorted(points)))
    sums = {name: UnitStats() for name in points}
    with torch.no_grad():
        for _, inputs in with_progress(calibration, desc, progress):
            _, feats = run(*inputs)
            for name, dim in points.items():
                sums[name].add(feats[name], dim)
    for s in sums.values():
        s.all_reduce()
    return sums

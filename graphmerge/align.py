"""Depth alignment: which units of a deeper stage the units of a shallower stage correspond to.

Training-free heterogeneous model merging (Xu et al. 2024, arXiv 2501.00061) merges networks of
different depths stage by stage.  Within a stage the deeper model has ``m`` units (e.g. residual
blocks) and the shallower one ``n <= m``.  This module

1. measures the similarity of every (deep unit, shallow unit) pair with linear CKA, using the
   unbiased minibatch HSIC estimator streamed over calibration batches
   (:class:`CKAAccumulator`, :func:`linear_cka`);
2. chooses, by dynamic programming, the deep positions ``l_1 < ... < l_n`` at which the shallow
   units sit (:func:`align`; methods ``"lma"``, ``"sma"``, ``"uniform"``), and the segment of deep
   units each shallow unit covers (:func:`segments`);
3. draws the CKA matrices with the chosen alignment (:func:`plot_alignment`).

Conventions used everywhere below: a CKA matrix is float64 ``[m, n]`` with the *deeper* stage's
units on the rows and the *shallower* stage's units on the columns; positions are 0-based row
indices.

Segments.  For positions ``l_1 < ... < l_n`` the segment of shallow unit ``k`` is
``seg_k = (l_{k-1}, l_k]`` with ``l_0 = -1``, so ``seg_1 = {0}`` (the first unit of a stage
changes stride or width and is always paired with the other model's first unit).  With ``"lma"``
the last segment ends at ``m - 1`` so every deep unit is covered; with ``"sma"`` deep units after
``l_n`` belong to no segment.

Tie rule.  When several position vectors reach the same optimal objective, :func:`align` returns
the lexicographically smallest one (earliest positions first).  Both dynamic programmes compute
the optimal value of every suffix problem first and then reconstruct forwards, taking at each
step the smallest row that reaches that optimum (``numpy.argmax`` returns the first maximum),
which yields exactly the lexicographically smallest optimal vector.  Ties are exact float
comparisons, so they are meaningful for matrices whose sums are exact (e.g. small integers);
for generic float data, ties within rounding error are resolved by whichever sum rounds higher.
"""

from __future__ import annotations

import logging
import operator
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from graphmerge.errors import ConfigError, DataError

__all__ = [
    "CKAAccumulator",
    "linear_cka",
    "hsic_unbiased",
    "ALIGN_METHODS",
    "align",
    "segments",
    "alignment_score",
    "plot_alignment",
]

log = logging.getLogger(__name__)

#: Names accepted by :func:`align`.
ALIGN_METHODS: tuple[str, ...] = ("lma", "sma", "uniform")

#: Smallest batch the unbiased HSIC estimator is defined for (it divides by n - 3).
MIN_BATCH = 4

# A unit whose mean self-HSIC is below this fraction of its mean ||K||_F^2 / (n(n-3)) is treated
# as constant (no measurable variation): its CKA with every other unit is reported as 0.
_DEGENERATE_RTOL = 1e-10


# --------------------------------------------------------------------------------------------
# Linear CKA, unbiased minibatch HSIC
# --------------------------------------------------------------------------------------------


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC estimator of two ``[b, b]`` Gram matrices (Song et al. 2012).

    The diagonals are ignored (set to zero), then
    ``HSIC = [tr(KL) + 1ᵀK1·1ᵀL1 / ((b-1)(b-2)) - 2·1ᵀKL1 / (b-2)] / (b(b-3))``.
    A plain reference for one pair; :class:`CKAAccumulator` computes the same for all pairs at
    once.  Cost O(b²).

    Raises:
        DataError: shapes differ, are not square, or ``b < 4``.
    """
    k = np.array(k, dtype=np.float64)
    l = np.array(l, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise DataError(
            f"hsic_unbiased needs two square Gram matrices of the same shape, got {k.shape} and "
            f"{l.shape}; pass X @ X.T and Y @ Y.T of the same batch")
    b = k.shape[0]
    if b < MIN_BATCH:
        raise DataError(f"the unbiased HSIC estimator needs a batch of at least {MIN_BATCH} "
                        f"samples, got {b}; use larger calibration batches")
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    k1, l1 = k.sum(1), l.sum(1)
    value = (np.sum(k * l)  # tr(KL) for symmetric K, L
             + k1.sum() * l1.sum() / ((b - 1) * (b - 2))
             - 2.0 * float(k1 @ l1) / (b - 2))
    return float(value / (b * (b - 3)))


class CKAAccumulator:
    """Streamed linear CKA between every unit of model A and every unit of model B.

    For each calibration batch (:meth:`update`) and each unit the linear Gram matrix
    ``K = X Xᵀ`` of its flattened output ``X [b, features]`` is formed once (float64, diagonal
    zeroed), and the unbiased HSIC of every (A unit i, B unit j) pair and of every unit with
    itself is accumulated.  :meth:`result` returns

        ``CKA[i, j] = mean_t HSIC(K_i, L_j) / sqrt(mean_t HSIC(K_i, K_i) · mean_t HSIC(L_j, L_j))``

    with means over batches (each batch weighs the same).

    Cost per batch of size ``b`` with ``m`` + ``n`` units of total feature width ``F``:
    O(b²·F) for the Gram matrices, O(m·n·b²) for the pairwise traces (one matrix product of
    flattened Grams), memory O((m + n)·b²) float64.  Accumulated state is O(m·n).

    Args:
        m: number of units of model A (rows of the result).
        n: number of units of model B (columns of the result).
    """

    def __init__(self, m: int, n: int) -> None:
        m_in, n_in = m, n
        try:
            m, n = operator.index(m), operator.index(n)
        except TypeError:
            m = n = 0
        if m < 1 or n < 1:
            raise ConfigError(f"CKAAccumulator needs positive integer unit counts, got "
                              f"m={m_in!r}, n={n_in!r}; pass the number of units of each model")
        self.m = m
        self.n = n
        self._cross = np.zeros((m, n))  # Σ_t HSIC(K_i, L_j)
        self._self_a = np.zeros(m)      # Σ_t HSIC(K_i, K_i)
        self._self_b = np.zeros(n)
        self._raw_a = np.zeros(m)       # Σ_t ||K_i||_F² / (b(b-3)), scale for degeneracy test
        self._raw_b = np.zeros(n)
        self.batches = 0
        self.samples = 0

    # -- per-batch work ----------------------------------------------------------------------

    @staticmethod
    def _grams(feats: Sequence[torch.Tensor | np.ndarray], model: str,
               batch: int | None) -> tuple[torch.Tensor, int]:
        """Flattened zero-diagonal Gram matrices ``[units, b*b]`` (float64, CPU) and ``b``."""
        grams = []
        for u, f in enumerate(feats):
            x = torch.as_tensor(f).detach()
            if x.ndim < 1:
                raise DataError(f"unit {u} of model {model}: output is a scalar; every unit's "
                                f"output must be a tensor [batch, ...]")
            b = x.shape[0]
            if batch is None:
                batch = b
            if b != batch:
                raise DataError(f"unit {u} of model {model}: batch size {b} differs from "
                                f"{batch} of the other units; feed all units the same batch")
            if x.device.type == "mps":  # no float64 there
                x = x.cpu()
            x = x.reshape(b, -1).to(torch.float64)
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"unit {u} of model {model}: output has NaN or inf values; "
                                f"check the model and the calibration data")
            g = x @ x.T
            g.fill_diagonal_(0.0)
            grams.append(g.reshape(-1).cpu())
        if batch is None:
            raise DataError(f"model {model}: no unit outputs given")
        return torch.stack(grams), batch

    @staticmethod
    def _hsic_parts(g: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row sums ``K1 [u, b]`` and totals ``1ᵀK1 [u]`` of flattened Grams ``[u, b*b]``."""
        k1 = g.reshape(g.shape[0], b, b).sum(2)
        return k1, k1.sum(1)

    def update(self, feats_a: Sequence[torch.Tensor | np.ndarray],
               feats_b: Sequence[torch.Tensor | np.ndarray]) -> None:
        """Add one calibration batch.

        Args:
            feats_a: the ``m`` outputs of model A's units, each ``[b, ...]`` (flattened to
                ``[b, features]``; everything after the batch axis is a feature).
            feats_b: the ``n`` outputs of model B's units on the same samples, each ``[b, ...]``.

        Raises:
            DataError: wrong number of units, differing batch sizes, ``b < 4``, non-finite values.
        """
        if len(feats_a) != self.m or len(feats_b) != self.n:
            raise DataError(f"expected {self.m} unit outputs of model A and {self.n} of model B, "
                            f"got {len(feats_a)} and {len(feats_b)}; pass every unit's output "
                            f"in unit order")
        ga, b = self._grams(feats_a, "A", None)
        gb, _ = self._grams(feats_b, "B", b)
        if b < MIN_BATCH:
            raise DataError(f"the unbiased HSIC estimator needs batches of at least {MIN_BATCH} "
                            f"samples, got {b}; use larger calibration batches (or drop the "
                            f"last partial batch)")
        ka1, ka = self._hsic_parts(ga, b)
        lb1, lb = self._hsic_parts(gb, b)
        c1 = 1.0 / ((b - 1) * (b - 2))
        c2 = 2.0 / (b - 2)
        scale = 1.0 / (b * (b - 3))

        trace = ga @ gb.T                                        # tr(K_i L_j)     [m, n]
        cross = (trace + c1 * torch.outer(ka, lb) - c2 * (ka1 @ lb1.T)) * scale
        sq_a = (ga * ga).sum(1)                                  # tr(K_i K_i)     [m]
        sq_b = (gb * gb).sum(1)
        self_a = (sq_a + c1 * ka * ka - c2 * (ka1 * ka1).sum(1)) * scale
        self_b = (sq_b + c1 * lb * lb - c2 * (lb1 * lb1).sum(1)) * scale

        self._cross += cross.numpy()
        self._self_a += self_a.numpy()
        self._self_b += self_b.numpy()
        self._raw_a += (sq_a * scale).numpy()
        self._raw_b += (sq_b * scale).numpy()
        self.batches += 1
        self.samples += b
        log.debug("CKA batch %d: %d samples, %d x %d units", self.batches, b, self.m, self.n)

    # -- results -----------------------------------------------------------------------------

    def _require(self) -> None:
        if self.batches == 0:
            raise DataError("no calibration batch was added to the CKA accumulator; call "
                            "update() with at least one batch before result()")

    @property
    def hsic(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean HSIC over batches: cross ``[m, n]``, A with itself ``[m]``, B with itself ``[n]``.
        """
        self._require()
        t = self.batches
        return self._cross / t, self._self_a / t, self._self_b / t

    def result(self) -> np.ndarray:
        """Linear CKA, float64 ``[m, n]`` (row i = unit i of A, column j = unit j of B).

        A unit whose outputs do not vary over the samples (self-HSIC ~ 0) has CKA 0 with every
        unit; a warning names it.  Cost O(m·n).

        Raises:
            DataError: no batch was added.
        """
        cross, sa, sb = self.hsic
        t = self.batches
        dead_a = sa <= _DEGENERATE_RTOL * (self._raw_a / t)
        dead_b = sb <= _DEGENERATE_RTOL * (self._raw_b / t)
        for name, dead in (("A", dead_a), ("B", dead_b)):
            if dead.any():
                log.warning("CKA: units %s of model %s have constant outputs over the "
                            "calibration data; their CKA is set to 0",
                            np.flatnonzero(dead).tolist(), name)
        da = np.sqrt(np.where(dead_a, 1.0, sa))
        db = np.sqrt(np.where(dead_b, 1.0, sb))
        cka = cross / np.outer(da, db)
        cka[dead_a, :] = 0.0
        cka[:, dead_b] = 0.0
        return cka


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA (unbiased HSIC) of two feature matrices of one batch.

    Args:
        x: ``[b, ...]`` features (flattened after the batch axis), ``b >= 4``.
        y: ``[b, ...]`` features of the same ``b`` samples.

    Cost O(b²·(p + q)) for feature widths p and q, memory O(b²).
    """
    acc = CKAAccumulator(1, 1)
    acc.update([x], [y])
    return float(acc.result()[0, 0])


# --------------------------------------------------------------------------------------------
# Alignment by dynamic programming
# --------------------------------------------------------------------------------------------


def _check(cka: np.ndarray) -> np.ndarray:
    c = np.asarray(cka, dtype=np.float64)
    if c.ndim != 2:
        raise DataError(f"the CKA matrix must be 2-D [deep units, shallow units], got shape "
                        f"{c.shape}")
    m, n = c.shape
    if n < 1 or m < 1:
        raise ConfigError(f"the CKA matrix {c.shape} has no units; each stage needs at least one "
                          f"unit in both models")
    if n > m:
        raise ConfigError(f"the CKA matrix has more columns ({n}) than rows ({m}); rows must be "
                          f"the deeper stage's units: transpose it (cka.T)")
    if not np.isfinite(c).all():
        raise DataError("the CKA matrix has NaN or inf entries; recompute it from finite features")
    return c


def _check_method(method: str) -> str:
    if method not in ALIGN_METHODS:
        raise ConfigError(f"unknown alignment method {method!r}; valid methods: "
                          f"{', '.join(ALIGN_METHODS)}")
    return method


def _uniform(m: int, n: int) -> list[int]:
    """``l_k = floor(k·(m-1)/(n-1) + 1/2)``, ``k = 0..n-1`` (halves round up); ``[0]`` if n=1."""
    if n == 1:
        return [0]
    return [(2 * k * (m - 1) + (n - 1)) // (2 * (n - 1)) for k in range(n)]


def _reconstruct(arrays: list[np.ndarray], n: int) -> list[int]:
    """Forward pass of both DPs: ``arrays[k][l]`` is the best objective of columns ``k..n-1``
    (up to a term that depends only on the previous position) with column ``k`` at row ``l``;
    take the first maximum after the previous position."""
    positions = [0]
    for k in range(1, n):
        prev = positions[-1]
        positions.append(prev + 1 + int(np.argmax(arrays[k][prev + 1:])))
    return positions


def _sma(c: np.ndarray) -> list[int]:
    """Max Σ_k c[l_k, k] over 0 = l_1 < l_2 < ... < l_n.  O(n·m) time and memory.

    Suffix values: ``A_k[l] = c[l, k] + max_{l' > l} A_{k+1}[l']`` (``-inf`` where infeasible),
    ``A_{n-1}[l] = c[l, n-1]``.
    """
    m, n = c.shape
    arrays: list[np.ndarray] = [np.empty(0)] * n
    nxt: np.ndarray | None = None
    for k in range(n - 1, 0, -1):
        a = np.full(m, -np.inf)
        lo, hi = k, m - n + k          # feasible rows of column k
        a[lo:hi + 1] = c[lo:hi + 1, k]
        if nxt is not None:
            # best of the next column strictly after l: suffix max shifted by one
            smax = np.maximum.accumulate(nxt[::-1])[::-1]
            after = np.full(m, -np.inf)
            after[:-1] = smax[1:]
            a = a + after
        arrays[k] = a
        nxt = a
    return _reconstruct(arrays, n)


def _lma(c: np.ndarray) -> list[int]:
    """Max Σ_k Σ_{l ∈ (l_{k-1}, l_k]} c[l, k] over 0 = l_1 < ... < l_n = m-1.  O(n·m).

    With column prefix sums ``P[l, k] = Σ_{r <= l} c[r, k]`` a segment sum is
    ``P[l_k, k] - P[l_{k-1}, k]``.  Suffix values:
    ``A_k[l] = P[l, k] + max_{l' > l} (A_{k+1}[l'] - P[l, k+1])``, ``A_{n-1}[l] = P[m-1, n-1]``
    at ``l = m-1`` only.
    """
    m, n = c.shape
    p = np.cumsum(c, axis=0)
    arrays: list[np.ndarray] = [np.empty(0)] * n
    a = np.full(m, -np.inf)
    a[m - 1] = p[m - 1, n - 1]
    arrays[n - 1] = a
    for k in range(n - 2, 0, -1):
        nxt = arrays[k + 1]
        smax = np.maximum.accumulate(nxt[::-1])[::-1]
        after = np.full(m, -np.inf)
        after[:-1] = smax[1:]
        a = np.full(m, -np.inf)
        lo, hi = k, m - n + k
        a[lo:hi + 1] = p[lo:hi + 1, k] + after[lo:hi + 1] - p[lo:hi + 1, k + 1]
        arrays[k] = a
    return _reconstruct(arrays, n)


def align(cka: np.ndarray, method: str = "lma") -> list[int]:
    """Positions ``l_1 < ... < l_n`` (0-based rows) of the shallow stage's units in the deep stage.

    Args:
        cka: float ``[m, n]``, ``n <= m``: CKA between the deep stage's units (rows) and the
            shallow stage's units (columns).
        method: ``"lma"`` (default): segment-wise, maximise Σ_k Σ_{l ∈ seg_k} CKA[l, k] with
            ``l_1 = 0`` and ``l_n = m-1``; ``"sma"``: maximise Σ_k CKA[l_k, k] with ``l_1 = 0``;
            ``"uniform"``: ``l_k = floor(k·(m-1)/(n-1) + 1/2)`` for ``k = 0..n-1`` (so
            ``l_1 = 0`` and ``l_n = m-1``; ties at .5 round up), independent of ``cka``.

    Always ``l_1 = 0`` (the stage's first unit changes stride or width and pairs with the other
    model's first unit); if ``n == 1`` the result is ``[0]`` for every method, and if ``n == m``
    it is ``[0, ..., m-1]``.  Ties: the lexicographically smallest optimal vector (see the
    module docstring).  Cost O(n·m) time and memory.

    Raises:
        ConfigError: unknown method, ``n > m`` or ``n < 1``.
        DataError: ``cka`` not 2-D or not finite.
    """
    _check_method(method)
    c = _check(cka)
    m, n = c.shape
    if n == m:
        return list(range(m))
    if n == 1:
        return [0]
    if method == "uniform":
        positions = _uniform(m, n)
    elif method == "sma":
        positions = _sma(c)
    else:
        positions = _lma(c)
    log.debug("align %s %dx%d -> %s", method, m, n, positions)
    return positions


def segments(positions: Sequence[int], m: int) -> list[list[int]]:
    """Deep units covered by each shallow unit: ``seg_k = (l_{k-1}, l_k]`` with ``l_0 = -1``.

    Args:
        positions: strictly increasing ``l_1 < ... < l_n`` in ``[0, m)``.
        m: number of deep units.

    Returns:
        ``n`` lists of row indices; deep units after ``l_n`` (possible with ``"sma"``) are in
        none of them.  Cost O(m).

    Raises:
        ConfigError: positions empty, not strictly increasing, or out of ``[0, m)``.
    """
    pos = [int(p) for p in positions]
    if not pos:
        raise ConfigError("positions is empty; pass at least one position (l_1 = 0)")
    if pos[0] < 0 or pos[-1] >= m or any(b <= a for a, b in zip(pos, pos[1:])):
        raise ConfigError(f"positions {pos} must be strictly increasing row indices in "
                          f"[0, {m}); use the output of align()")
    out, prev = [], -1
    for p in pos:
        out.append(list(range(prev + 1, p + 1)))
        prev = p
    return out


def alignment_score(cka: np.ndarray, positions: Sequence[int], method: str) -> float:
    """The objective :func:`align` maximises, for any positions.

    ``"sma"``: Σ_k CKA[l_k, k]; ``"lma"`` and ``"uniform"``: Σ_k Σ_{l ∈ seg_k} CKA[l, k].
    Cost O(m).
    """
    _check_method(method)
    c = _check(cka)
    m, n = c.shape
    if len(positions) != n:
        raise ConfigError(f"{len(positions)} positions for {n} shallow units; pass one per "
                          f"column of the CKA matrix")
    if method == "sma":
        segments(positions, m)  # validates
        return float(sum(c[l, k] for k, l in enumerate(positions)))
    return float(sum(c[l, k] for k, seg in enumerate(segments(positions, m)) for l in seg))


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


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
        c = _check(cka)
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote alignment plot %s (%d stages)", path, k)
    return path

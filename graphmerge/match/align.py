"""Depth alignment: which units of a deeper stage the units of a shallower stage correspond to.

Training-free heterogeneous model merging (Xu et al. 2024, arXiv 2501.00061) merges networks of
different depths stage by stage.  Within a stage the deeper model has ``m`` units (e.g. residual
blocks) and the shallower one ``n <= m``.  This module

chooses, from the CKA similarity of every (deep unit, shallow unit) pair
(:mod:`graphmerge.match.cka`), by dynamic programming, the deep positions ``l_1 < ... < l_n`` at which the shallow
   units sit (:func:`align`; methods ``"lma"``, ``"sma"``, ``"uniform"``), and the segment of deep
   units each shallow unit covers (:func:`segments`).

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from graphmerge.errors import ConfigError, DataError

__all__ = [
    "StageAlignment",
    "ALIGN_METHODS",
    "align",
    "segments",
    "alignment_score",
    "check_cka",
]

log = logging.getLogger(__name__)

@dataclass
class StageAlignment:
    """The alignment of one stage: depths of every model, the reference (deepest) model, and
    for every model the reference positions of its units (its CKA matrix against the
    reference: rows = reference units, columns = its units)."""

    stage: int
    name: str                 # the reference's stage, named by the value entering it
    depths: list[int]
    reference: int
    positions: list[list[int]]
    cka: list[np.ndarray | None] = field(default_factory=list)
    # post-norm units: per fitted norm of an inserted unit, the relative error it leaves
    fit_errors: dict[str, float] = field(default_factory=dict)
    # nodes inside identity units inserted into some model (not read when matching)
    inserted: set[str] = field(default_factory=set)



#: Names accepted by :func:`align`.
ALIGN_METHODS: tuple[str, ...] = ("lma", "sma", "uniform")

def check_cka(cka: np.ndarray) -> np.ndarray:
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
    c = check_cka(cka)
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
    c = check_cka(cka)
    m, n = c.shape
    if len(positions) != n:
        raise ConfigError(f"{len(positions)} positions for {n} shallow units; pass one per "
                          f"column of the CKA matrix")
    if method == "sma":
        segments(positions, m)  # validates
        return float(sum(c[l, k] for k, l in enumerate(positions)))
    return float(sum(c[l, k] for k, seg in enumerate(segments(positions, m)) for l in seg))

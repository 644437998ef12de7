"""Matchers: decide which units of N models become one merged unit, for one space.

A *space* is a set of neurons/channels that share one transform.  Model ``i`` has ``d_i``
units in it; the features of all models, stacked (model 0 first, then model 1, ...), give a
float64 correlation matrix ``corr`` of shape ``[d, d]`` with ``d = sum(d_i)``.  A matcher turns
``corr`` into, for every model ``i``,

* a merge matrix ``M_i`` of shape ``[r, d_i]`` and
* an unmerge matrix ``U_i`` of shape ``[d_i, r]``,

where ``r`` is the merged width.  Merged weights are later ``sum_i M_i @ W_i @ U_i``.

Matchers (registry :data:`MATCHERS`, lookup :func:`get_matcher`):

``"average"``  plain weight averaging (:func:`average_match`): ``M_i = I / N``, ``U_i = I``
               (equal widths only).
``"permute"``  Git Re-Basin-style activation matching (:func:`hungarian_match`): model 0's units
               are Hungarian-matched to
               every other model's units; merged unit ``k`` averages unit ``k`` of model 0 with
               its matches (equal widths only).
``"zip"``      (default) elastic ZipIt!: greedy merging of the most correlated pair of current
               groups, across *and* within models, down to any width ``1 <= r <= d``.  See
               :func:`zip_match` for the exact rule, :func:`zip_groups_naive` for a plain
               reference implementation and :func:`zip_groups` for the fast one (same output,
               bit for bit); :func:`zip_groups_candidates` applies the rule to each group's
               best partners only (``zip_match(candidates=k)``: no copy of ``corr``, not
               exact).

``corr`` may be a numpy array or a torch tensor (the statistics give one on their device); the
matchers read its upper triangle where it lies and copy only what they need.

:func:`correlation_from_moments` builds ``corr`` from streamed sums.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import mmap
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from graphmerge.errors import ConfigError, DataError, MismatchError

__all__ = [
    "Match",
    "Matcher",
    "MATCHERS",
    "DEFAULT_MATCHER",
    "get_matcher",
    "average_match",
    "hungarian_match",
    "zip_match",
    "zip_groups",
    "zip_groups_naive",
    "zip_groups_candidates",
    "zip_budgets",
    "correlation_from_moments",
    "correlation_in_place",
    "group_correlations",
]

log = logging.getLogger(__name__)

DEFAULT_MATCHER = "zip"

# Rows per block when a [d, d] matrix is built or mirrored, and when the zip's row maxima are
# started; columns per block of a transposing copy.
_TILE = 256
_BLOCK = 64


# --------------------------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------------------------


@dataclass
class Match:
    """How the units of N models merge into ``r`` units.

    Attributes:
        merge: ``M_i`` per model, float64 ``[r, d_i]``; merged = ``sum_i M_i @ x_i``.
        unmerge: ``U_i`` per model, float64 ``[d_i, r]``; unit of model i ~ ``U_i @ merged``.
        groups: per merged unit, in output order, the global unit indices it merges
            (global index = offset of the model + local index; each list ascending).
        mean_correlation: mean, over merged units with >= 2 members, of the mean pairwise
            correlation of their members (``nan`` if no unit merges two or more units).
    """

    merge: list[np.ndarray]
    unmerge: list[np.ndarray]
    groups: list[list[int]]
    mean_correlation: float

    @property
    def width(self) -> int:
        """The merged width ``r``."""
        return len(self.groups)


# --------------------------------------------------------------------------------------------
# Argument checks shared by the matchers
# --------------------------------------------------------------------------------------------


def _check_widths(widths: Sequence[int]) -> list[int]:
    """Widths as a list of positive Python ints, or ConfigError."""
    try:
        ws = [operator.index(w) for w in widths]
    except TypeError as exc:
        raise ConfigError(
            f"widths must be a sequence of positive integers (one per model), got {widths!r}"
        ) from exc
    if not ws:
        raise ConfigError("widths is empty; pass one positive width per model, e.g. [64, 64]")
    bad = [(i, w) for i, w in enumerate(ws) if w < 1]
    if bad:
        raise ConfigError(
            f"every width must be >= 1; got (model, width) {bad} in widths={ws}"
        )
    return ws


def _as_tensor(corr: object) -> torch.Tensor:
    """``corr`` as a floating torch tensor, without a copy where possible (a numpy array or a
    tensor keeps its memory and its device); DataError for anything else."""
    try:
        c = torch.as_tensor(corr)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"corr must be a numpy array or a torch tensor, got "
                        f"{type(corr).__name__}") from exc
    return c if c.is_floating_point() else c.double()


def _check_corr(corr: object, d: int) -> torch.Tensor:
    """``corr`` [d, d] as a torch tensor on its own device (no copy); DataError on bad input.

    The check is cheap, two reductions (O(d^2) reads, O(d) memory): the row sums must equal
    the column sums up to rounding, which an asymmetric entry upsets, and be finite (+-inf is
    rejected; NaN is read as 0, on a copy made only then).  The matchers read only the upper
    triangle of ``corr``.
    """
    c = _as_tensor(corr)
    if tuple(c.shape) != (d, d):
        raise DataError(
            f"corr has shape {tuple(c.shape)} but the widths sum to d={d}; pass the [d, d] "
            "correlation of all models' units stacked (model 0 first)"
        )
    rows, cols = c.sum(dim=1, dtype=torch.float64), c.sum(dim=0, dtype=torch.float64)
    if not bool(torch.isfinite(rows).all() and torch.isfinite(cols).all()):
        finite = torch.nan_to_num(c, nan=0.0)  # a copy, only when there is NaN or inf
        rows, cols = finite.sum(dim=1, dtype=torch.float64), finite.sum(dim=0,
                                                                         dtype=torch.float64)
        if not bool(torch.isfinite(rows).all() and torch.isfinite(cols).all()):
            raise DataError(
                "corr contains +-inf; correlations must be finite (NaN is allowed and read as "
                "0)"
            )
    worst = float((rows - cols).abs().max())
    if worst > 1e-6 * float(torch.maximum(rows.abs(), cols.abs()).max()) + 1e-9 * d:
        raise DataError(
            f"corr is not symmetric (its row and column sums differ by up to {worst:.3g}); "
            "pass a correlation matrix, e.g. from correlation_from_moments()"
        )
    return c


def _check_r(r: int | None, d: int, default: int) -> int:
    """Target width: ``default`` when None, else an int in [1, d] (ConfigError otherwise)."""
    if r is None:
        return default
    try:
        r = operator.index(r)
    except TypeError as exc:
        raise ConfigError(f"r must be an integer in [1, {d}] or None, got {r!r}") from exc
    if not 1 <= r <= d:
        raise ConfigError(
            f"r={r} is out of range: the merged width must satisfy 1 <= r <= d = {d} "
            "(sum of the models' widths); use r=None for the default"
        )
    return r


def _check_equal_widths(ws: list[int], method: str) -> int:
    if len(set(ws)) != 1:
        raise MismatchError(
            f"method={method!r} needs equal widths in every model, got widths={ws}; "
            'use method="zip", which merges models of different widths'
        )
    return ws[0]


def _check_fixed_r(r: int | None, width: int, method: str) -> None:
    if r is not None and r != width:
        raise ConfigError(
            f"method={method!r} always produces the models' width {width}, got r={r}; "
            f'pass r=None (or r={width}), or use method="zip" for other widths'
        )


def _check_alpha_beta(alpha: float, beta: float) -> tuple[float, float]:
    alpha = float(alpha)
    beta = float(beta)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}; ZipIt! uses alpha=0.5")
    if not (math.isfinite(beta) and beta >= 0.0):
        raise ConfigError(
            f"beta must be a finite number >= 0, got {beta}; beta=0 forbids merging units of "
            "the same model, beta=1 (default) gives each model its proportional share"
        )
    return alpha, beta


def _offsets(ws: list[int]) -> list[int]:
    return [0, *itertools.accumulate(ws)]


# --------------------------------------------------------------------------------------------
# Building a Match from groups
# --------------------------------------------------------------------------------------------


def group_correlations(corr: np.ndarray | torch.Tensor, groups: list[list[int]]) -> list[float]:
    """Per group with >= 2 members, in order, the mean pairwise correlation of its members
    (what a merge averaged: the report's histograms; NaN read as 0).  Reads ``corr[i, j]``,
    ``i < j``, on its device: one gather of the O(sum |g|^2) pairs."""
    multi = [sorted(g) for g in groups if len(g) >= 2]
    if not multi:
        return []
    pairs = [(i, j, k) for k, g in enumerate(multi) for i, j in itertools.combinations(g, 2)]
    ii, jj, gid = (np.array(x, dtype=np.int64) for x in zip(*pairs))
    c = _as_tensor(corr)
    at = [torch.from_numpy(x).to(c.device) for x in (ii, jj)]
    vals = np.nan_to_num(c[at[0], at[1]].to("cpu", torch.float64).numpy())
    sums = np.bincount(gid, weights=vals, minlength=len(multi))
    return [float(x) for x in sums / np.bincount(gid, minlength=len(multi))]


def _mean_group_correlation(corr: np.ndarray | torch.Tensor, groups: list[list[int]]) -> float:
    """Mean over groups with >= 2 members of their mean pairwise correlation."""
    means = group_correlations(corr, groups)
    return float(np.mean(means)) if means else float("nan")


def _sparse_zeros(rows: int, cols: int) -> np.ndarray:
    """A float64 [rows, cols] array of zeros for a matrix that stays mostly zeros: a large one
    is an anonymous mapping, whose pages take memory only once written (a zeroed buffer
    would write, and hold, every page; numpy's would take huge pages)."""
    if rows * cols < 1 << 17:
        return np.zeros((rows, cols))
    return np.frombuffer(mmap.mmap(-1, rows * cols * 8), dtype=np.float64).reshape(rows, cols)


def _match_from_groups(corr: np.ndarray | torch.Tensor, ws: list[int],
                       groups: list[list[int]]) -> Match:
    """``U_i`` = group membership [d_i, r] (0/1); ``M_i`` = ``U_i.T`` with rows divided by
    group size, written per model.  Cost O(d r) memory (the dense matrices) and O(d) writes."""
    unit = np.fromiter(itertools.chain.from_iterable(groups), dtype=np.int64)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    col = np.repeat(np.arange(len(groups)), sizes)
    weight = 1.0 / sizes.astype(np.float64)
    merge, unmerge = [], []
    for a, b in itertools.pairwise(_offsets(ws)):
        own = (unit >= a) & (unit < b)
        u = _sparse_zeros(b - a, len(groups))
        m = _sparse_zeros(len(groups), b - a)
        u[unit[own] - a, col[own]] = 1.0
        m[col[own], unit[own] - a] = weight[col[own]]
        merge.append(m)
        unmerge.append(u)
    return Match(merge=merge, unmerge=unmerge, groups=groups,
                 mean_correlation=_mean_group_correlation(corr, groups))


# --------------------------------------------------------------------------------------------
# average / permute
# --------------------------------------------------------------------------------------------


def average_match(corr: np.ndarray, widths: Sequence[int], r: int | None = None) -> Match:
    """Plain averaging: ``M_i = I / N``, ``U_i = I``; merged unit k = units k of all models.

    Args:
        corr: [d, d] correlation (only used for ``mean_correlation`` and shape checks).
        widths: ``d_i`` per model; must all be equal (MismatchError otherwise).
        r: None or the common width (ConfigError otherwise).

    Cost O(d^2) reads for the checks.
    """
    ws = _check_widths(widths)
    w = _check_equal_widths(ws, "average")
    _check_fixed_r(r, w, "average")
    c = _check_corr(corr, sum(ws))
    n = len(ws)
    groups = [[i * w + k for i in range(n)] for k in range(w)]
    eye = np.eye(w)
    return Match(
        merge=[eye / n for _ in range(n)],
        unmerge=[eye.copy() for _ in range(n)],
        groups=groups,
        mean_correlation=_mean_group_correlation(c, groups),
    )


def hungarian_match(corr: np.ndarray, widths: Sequence[int], r: int | None = None) -> Match:
    """Activation matching to model 0 (Git Re-Basin style), then averaging.

    For every model ``i >= 1`` the Hungarian algorithm (maximising) matches model 0's units to
    model i's on the cross-correlation block ``corr[block_0, block_i]``; merged unit ``k`` is the
    mean of model 0's unit ``k`` and its match in every other model.  Hence ``U_0 = I``,
    ``U_i`` is a permutation matrix and each row of each ``M_i`` holds one ``1/N``.

    Args:
        corr: [d, d] correlation, units ordered model 0 first.
        widths: ``d_i`` per model; must all be equal (MismatchError otherwise).
        r: None or the common width (ConfigError otherwise).

    Cost O((N-1) w^3) for the assignments (w = common width), on the host (scipy): each
    block [w, w] is copied there once; O(d^2) reads for the checks.
    """
    ws = _check_widths(widths)
    w = _check_equal_widths(ws, "permute")
    _check_fixed_r(r, w, "permute")
    c = _check_corr(corr, sum(ws))
    n = len(ws)
    eye = np.eye(w)
    merge = [eye / n]
    unmerge = [eye.copy()]
    groups = [[k] for k in range(w)]
    for i in range(1, n):
        block = np.nan_to_num(c[:w, i * w:(i + 1) * w].to("cpu", torch.float64).numpy())
        rows, cols = linear_sum_assignment(block, maximize=True)
        match = np.empty(w, dtype=np.int64)
        match[rows] = cols  # model 0's unit k <-> model i's unit match[k]
        mi = np.zeros((w, w))
        mi[np.arange(w), match] = 1.0 / n
        ui = np.zeros((w, w))
        ui[match, np.arange(w)] = 1.0
        merge.append(mi)
        unmerge.append(ui)
        for k in range(w):
            groups[k].append(i * w + int(match[k]))
    return Match(merge=merge, unmerge=unmerge, groups=groups,
                 mean_correlation=_mean_group_correlation(c, groups))


# --------------------------------------------------------------------------------------------
# ZipIt: the grouping rule, a naive reference and the fast implementation
# --------------------------------------------------------------------------------------------


def zip_budgets(widths: Sequence[int], r: int, beta: float) -> np.ndarray:
    """Within-model merge budgets: ``floor(beta * (d - r) * d_i / d)`` per model, int64 [N].

    Computed exactly with fractions, reading ``beta`` as the decimal it prints as (so
    ``beta=0.3`` means 3/10, not the binary float just below it).
    """
    ws = _check_widths(widths)
    d = sum(ws)
    b = Fraction(repr(float(beta)))
    return np.array([math.floor(b * (d - r) * w / d) for w in ws], dtype=np.int64)


def _prepare_scores(
    C: np.ndarray | torch.Tensor, widths: Sequence[int], r: int, alpha: float, beta: float,
    symmetric: bool = False,
) -> tuple[torch.Tensor, list[int], int, float, float]:
    """Validate the zip_groups arguments; return a private score matrix and clean arguments.

    The scores are a float64 copy of ``C`` [d, d] on ``C``'s device with NaN -> 0, the strict
    upper triangle mirrored into the lower one (so only ``C[i, j]``, ``i < j``, is read) and
    ``-inf`` on the diagonal.  Off-diagonal +-inf raises DataError.  Cost O(d^2): one copy, the
    lower triangle written by blocks of rows from transposed column strips (torch tiles the
    transposing copy), NaN looked for only when the sum is not finite.  ``symmetric``: ``C``
    is taken as symmetric after the cheap check of :func:`_check_corr` (DataError unless it is,
    up to rounding) and copied as it is, without the mirroring (which reads across memory).
    """
    ws = _check_widths(widths)
    d = sum(ws)
    c = _check_corr(C, d) if symmetric else _as_tensor(C)
    if tuple(c.shape) != (d, d):
        raise DataError(f"C has shape {tuple(c.shape)} but the widths {ws} sum to d={d}; pass "
                        "[d, d]")
    r = _check_r(r, d, d)
    alpha, beta = _check_alpha_beta(alpha, beta)
    s = torch.empty((d, d), dtype=torch.float64, device=c.device)
    if symmetric:
        s.copy_(c)
    else:
        for a in range(0, d, _TILE):
            b = min(a + _TILE, d)
            s[a:b, a:] = c[a:b, a:]
            _transposed(c, a, b, a, s[a:b])
            tile = s[a:b, a:b]
            tile.copy_(tile.triu(1) + tile.triu(1).T)
    s.diagonal().zero_()
    if not bool(torch.isfinite(s.sum())):  # cheap: a finite sum has finite terms
        s.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
        if not bool(torch.isfinite(s).all()):
            raise DataError("C has +-inf off the diagonal; scores must be finite (NaN reads as "
                            "0)")
    s.diagonal().fill_(-math.inf)
    return s, ws, r, alpha, beta


def _damping(count: np.ndarray, p: int, alpha: float) -> np.ndarray | float:
    """Per group j, the factor of a fold's ``min`` against j (group p just folded; ``count``
    [groups, models]: units per model): ``alpha``, except 1 where p and j each hold at most
    one unit per model and share no model. Such a pair is one unit matched across models (a
    third copy of a unit two models share), not a group folding ever more of itself, which is
    what ZipIt!'s damping is for; undamped, N permuted copies of a model zip back into it. Two
    models never meet the exception: a folded group then covers both."""
    mine = count[p] > 0
    if count[p].max() > 1 or mine.all():
        return alpha
    apart = (count.max(axis=1) <= 1) & ~(count[:, mine] > 0).any(axis=1)
    return np.where(apart, 1.0, alpha)


def zip_groups_naive(
    C: np.ndarray, widths: Sequence[int], r: int, alpha: float = 0.5, beta: float = 1.0
) -> list[list[int]]:
    """Reference ZipIt grouping: recompute the full masked argmax at every merge.

    Same rule and output as :func:`zip_groups` (see :func:`zip_match` for the rule); kept
    plain so it is obviously correct: the forbidden pairs are a boolean matrix ``K`` [d, d]
    over groups (indexed by their lowest unit).  Time O((d - r) d^2), memory O(d^2).

    Returns:
        ``r`` groups of global unit indices, each ascending, ordered by their lowest index.
    """
    S, ws, r, alpha, beta = _prepare_scores(C, widths, r, alpha, beta)
    S = S.cpu().numpy()
    d = S.shape[0]
    model = np.repeat(np.arange(len(ws)), ws)  # model of each unit = model of the group it heads
    budget = zip_budgets(ws, r, beta)
    alive = np.ones(d, dtype=bool)
    members = [[i] for i in range(d)]
    upper = np.triu(np.ones((d, d), dtype=bool), k=1)
    forbidden = np.zeros((d, d), dtype=bool)  # K: pairs of groups that may not merge
    count = np.zeros((d, len(ws)), dtype=np.int64)  # units per model of each group
    count[np.arange(d), model] = 1
    lifted = False

    def budget_spent(m: int) -> None:
        """Model m's budget is 0: forbid every pair of live groups both headed by m."""
        heads = alive & (model == m)
        forbidden[np.ix_(heads, heads)] = True

    for m in np.flatnonzero(budget <= 0):
        budget_spent(int(m))

    while alive.sum() > r:
        allowed = upper & alive[:, None] & alive[None, :]
        if not lifted:
            allowed &= ~forbidden
        if not allowed.any():
            lifted = True
            log.debug("zip (naive): no allowed pair left with %d groups > r=%d; lifting the "
                      "within-model budgets", int(alive.sum()), r)
            continue
        candidates = np.flatnonzero(allowed)  # row-major order
        best = candidates[np.argmax(S.ravel()[candidates])]  # first maximum wins ties
        p, q = divmod(int(best), d)
        count[p] += count[q]
        with np.errstate(invalid="ignore"):  # alpha = 0 times the -inf diagonal; not read
            merged = _damping(count, p, alpha) * np.minimum(S[p], S[q])
        S[p, :] = merged
        S[:, p] = merged
        S[p, p] = -np.inf
        forbidden[p, :] |= forbidden[q, :]
        forbidden[:, p] = forbidden[p, :]
        alive[q] = False
        members[p] += members[q]
        if model[p] == model[q] and not lifted:
            budget[model[p]] -= 1
            if budget[model[p]] == 0:
                budget_spent(int(model[p]))

    return [sorted(members[i]) for i in np.flatnonzero(alive)]


def zip_groups(
    C: np.ndarray, widths: Sequence[int], r: int, alpha: float = 0.5, beta: float = 1.0
) -> list[list[int]]:
    """Fast ZipIt grouping; returns exactly what :func:`zip_groups_naive` returns.

    Keeps, for every live group ``i``, the maximum ``rowmax[i]`` of ``C[i, j]`` over allowed live
    ``j > i`` and its first (smallest) position ``rowarg[i]`` (``-inf`` / ``-1`` if none).  The
    next pair is row ``p`` = first maximum of ``rowmax``, ``q = rowarg[p]``: the row-major first
    maximum.  After folding ``q`` into ``p`` only these rows can be stale:

    * row ``p`` (its whole row changed)                      -> recomputed;
    * rows ``i < p`` see the new ``C[i, p]`` (which may be *larger* than before when the
      correlations are negative): it becomes the maximum if larger, or if equal and ``p``
      comes first.  That settles a row whose maximum was at ``q`` (every column before ``q``
      was smaller) or at ``p`` (every other column is at most the old maximum);
    * rows ``i < p`` whose maximum was at ``p`` and dropped  -> recomputed;
    * rows ``i < q`` whose maximum was at ``q`` and that ``p`` did not take -> recomputed;
    * rows ``i > q`` never see ``p`` or ``q`` (lower triangle) and are untouched;
    * when model ``m``'s budget reaches 0, rows of model ``m`` whose maximum is in model ``m``
      are recomputed (other rows only lose entries below their maximum);
    * when the flags are lifted, every row is recomputed (once).

    The flags ``K`` are kept per group as the models whose flag it carries: ``K(G, H)`` iff
    ``G`` and ``H`` carry a common one (model ``m``'s is given to its live groups when its
    budget runs out, and a fold unites what the two groups carry).  A row is masked by adding
    ``-inf`` penalties: one row for the dead groups (they are not erased from the score matrix,
    which would be a strided column write) and one per model for the groups carrying its flag.

    The scores are kept in the upper triangle: a fold writes row ``p`` right of the diagonal
    and column ``p`` above it (at the live rows only); the lower triangle is never written and
    is read, in place, for the pairs that were never rescored (neither group survived a fold),
    so a caller may lend its correlation (``zip_match(overwrite=True)``) and read the
    correlations from the lower triangle afterwards.

    Cost: the O(d^2) copy, O(d) per row to start, then per merge a few O(d) vector operations,
    a strided column gather and write over the live (rescored) groups and O(d) per recomputed
    row (typically a few).  Measured with one
    thread (``benchmarks/results/speed.md``): d = 2048+1024 -> 2048 in about 0.1 s, over 100
    times faster than :func:`zip_groups_naive`; 8192+8192 -> 8192 in about 5 s.  Memory: the
    float64 score copy, O(d^2), and O(N d) for the flags of N models.

    Returns:
        ``r`` groups of global unit indices, each ascending, ordered by their lowest index.
    """
    S, ws, r, alpha, beta = _prepare_scores(C, widths, r, alpha, beta)
    return _Zipper(S.cpu().numpy(), ws, r, alpha, beta).run()


class _Zipper:
    """The state of one fast ZipIt grouping (:func:`zip_groups`): the scores, the flags each
    group carries and every live row's allowed maximum, kept exact merge by merge."""

    def __init__(self, S: np.ndarray, ws: list[int], r: int, alpha: float, beta: float) -> None:
        d = S.shape[0]
        self.S, self.d, self.r, self.alpha = S, d, r, alpha
        self.model = np.repeat(np.arange(len(ws)), ws)
        self.budget = zip_budgets(ws, r, beta)
        self.many = len(ws) > 2  # only then may a fold go undamped (`_damping`)
        self.count = np.zeros((d, len(ws)), dtype=np.int64)  # units per model of each group
        self.count[np.arange(d), self.model] = 1
        self.carries: list[list[int]] = [[] for _ in range(d)]  # models whose flag it carries
        self.ban = np.zeros((len(ws), d))  # ban[m, j] = -inf iff group j carries model m's flag
        self.dead = np.zeros(d)  # -inf for a dead group
        self.lifted = False
        self.alive = np.ones(d, dtype=bool)
        self.members = [[i] for i in range(d)]
        self.rowmax = np.full(d, -np.inf)
        self.rowarg = np.full(d, -1, dtype=np.int64)
        self.n_groups = d
        self.survived = np.zeros(d, dtype=bool)  # rescored: its row and column were merged

    def flag(self, m: int) -> None:
        """Model m's budget is 0: its live groups carry its flag."""
        heads = np.flatnonzero(self.alive & (self.model == m))
        self.ban[m, heads] = -np.inf
        for g in heads:
            self.carries[g].append(m)

    def flagged(self, i: int, row: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """``row`` (= C[i, lo:hi], dead columns at -inf) with -inf at the live columns that
        share a flag with group i; ``row`` itself when there are none."""
        if not self.lifted:
            for m in self.carries[i]:
                row = row + self.ban[m, lo:hi]
        return row

    def recompute(self, i: int, row: np.ndarray | None = None) -> None:
        """Exact maximum of live row ``i`` over allowed live columns ``j > i``; ``row`` is
        ``C[i, i + 1:]`` with the dead columns at -inf if the caller has it.  O(d)."""
        d = self.d
        if i + 1 == d:
            self.rowmax[i], self.rowarg[i] = -np.inf, -1
            return
        if row is None:
            row = self.S[i, i + 1:] + self.dead[i + 1:]
        vals = self.flagged(i, row, i + 1, d)
        a = int(vals.argmax())  # first maximum -> smallest column on ties
        self.rowmax[i] = vals[a]
        self.rowarg[i] = i + 1 + a if vals[a] > -np.inf else -1

    def start(self) -> None:
        """Flag the models with no budget, then every row's maximum, _TILE rows at a time: row
        i of the block [a, b) keeps columns > i."""
        S, d, model = self.S, self.d, self.model
        for m in np.flatnonzero(self.budget <= 0):
            self.flag(int(m))
        for a in range(0, d - 1, _TILE):
            b = min(a + _TILE, d - 1)
            block = S[a:b, a + 1:] + self.ban[model[a:b], a + 1:]  # a model's flag: all or none
            block[np.tril_indices(b - a, -1)] = -np.inf
            at = block.argmax(axis=1)
            self.rowmax[a:b] = block[np.arange(b - a), at]
            self.rowarg[a:b] = np.where(self.rowmax[a:b] > -np.inf, a + 1 + at, -1)

    def lift(self) -> None:
        """No allowed pair is left: drop the within-model budgets and recompute every row."""
        self.lifted = True
        log.debug("zip: no allowed pair left with %d groups > r=%d; lifting the "
                  "within-model budgets", self.n_groups, self.r)
        for i in np.flatnonzero(self.alive):
            self.recompute(int(i))

    def fold(self, p: int, q: int) -> int:
        """Fold group q into group p: members, flags and budget.  Returns the model whose
        budget just ran out, -1 if none."""
        model, carries = self.model, self.carries
        self.alive[q] = False
        self.dead[q] = -np.inf
        self.rowmax[q], self.rowarg[q] = -np.inf, -1
        self.n_groups -= 1
        self.members[p] += self.members[q]
        self.members[q] = []
        if self.many:
            self.count[p] += self.count[q]
        for m in carries[q]:
            if m not in carries[p]:
                carries[p].append(m)
                self.ban[m, p] = -np.inf
        event = -1
        if model[p] == model[q] and not self.lifted:
            self.budget[model[p]] -= 1
            if self.budget[model[p]] == 0:
                event = int(model[p])
                self.flag(event)
        return event

    def row(self, i: int) -> np.ndarray:
        """The current scores of live group i against every live group (the naive version's
        S[i]; other entries finite or -inf, masked by the caller), -inf on the diagonal. The
        scores are kept in the upper triangle where a pair was rescored (one of the two, live,
        survived a fold); any other pair is read from S[i, j] as given (for j < i the lower
        triangle, in place), so only the rescored live entries of column i are gathered."""
        S = self.S
        out = np.empty(self.d)
        out[i + 1:] = S[i, i + 1:]
        out[:i] = S[i, :i]
        above = np.flatnonzero(self.alive[:i] if self.survived[i] else self.survived[:i])
        out[above] = S[above, i]
        out[i] = -np.inf
        return out

    def merge_scores(self, p: int, q: int) -> np.ndarray:
        """Row and column p become the naive version's damped min(S[p], S[q]), -inf at dead
        groups and on the diagonal, kept in the upper triangle (row p right of the diagonal,
        column p above it at the live rows; the lower triangle is never written); row p's
        maximum is recomputed.  Returns that row."""
        S = self.S
        merged = self.row(p)
        np.minimum(merged, self.row(q), out=merged)
        self.survived[q] = False  # dead: its scores are no longer read
        factor = _damping(self.count, p, self.alpha) if self.many else self.alpha
        if np.ndim(factor):
            np.multiply(merged, factor, out=merged, where=np.isfinite(merged))  # (p, q: -inf)
        elif factor == 0.0:
            merged[:] = 0.0
        else:
            merged *= factor
        merged += self.dead
        merged[p] = -np.inf
        S[p, p + 1:] = merged[p + 1:]
        above = np.flatnonzero(self.alive[:p])
        S[above, p] = merged[above]
        self.survived[p] = True
        self.recompute(p, merged[p + 1:])
        return merged

    def refresh_rows(self, p: int, q: int, merged: np.ndarray, event: int) -> None:
        """Settle the rows above p that see the new C[i, p], and recompute the stale ones (see
        :func:`zip_groups`)."""
        rowmax, rowarg, model = self.rowmax, self.rowarg, self.model
        v = self.flagged(p, merged[:p], 0, p)  # the new C[i, p] for the rows above, masked
        mx = rowmax[:p]
        arg = rowarg[:p]
        gain = np.flatnonzero((v > mx) | ((v == mx) & (arg > p)))
        dropped = np.flatnonzero((arg == p) & (v < mx))
        rowmax[gain] = v[gain]
        rowarg[gain] = p
        redo = [dropped, np.flatnonzero(rowarg[:q] == q)]
        if event >= 0:
            mine = np.flatnonzero(self.alive & (model == event) & (rowarg >= 0))
            redo.append(mine[model[rowarg[mine]] == event])
        for rows in redo:
            for i in rows:
                self.recompute(int(i))

    def run(self) -> list[list[int]]:
        """Merge the row-major first maximal allowed pair until r groups are left."""
        self.start()
        while self.n_groups > self.r:
            p = int(self.rowmax.argmax())  # first maximal row = smallest p on ties
            if self.rowmax[p] == -np.inf:
                self.lift()
                continue
            q = int(self.rowarg[p])
            event = self.fold(p, q)
            merged = self.merge_scores(p, q)
            self.refresh_rows(p, q, merged, event)
        return [sorted(self.members[i]) for i in np.flatnonzero(self.alive)]


def zip_match(
    corr: np.ndarray,
    widths: Sequence[int],
    r: int | None = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    candidates: int = 0,
    overwrite: bool = False,
) -> Match:
    """Elastic ZipIt!: greedily merge the most correlated groups, within and across models.

    Rule (``C`` starts as ``corr``, symmetric up to rounding (checked), with NaN -> 0 and
    -inf on the diagonal):

    1. Target width ``r``: default ``max_i d_i``; any ``1 <= r <= d``.
    2. ``R = d - r`` merges are made.  Model ``i`` may merge ``budget_i =
       floor(beta * R * d_i / d)`` pairs of its own groups (:func:`zip_budgets`).  A group is
       indexed by, and belongs to the model of, its lowest unit.
    3. Forbidden pairs: a flag ``K(G, H)`` per pair of live groups, all clear at first; a pair
       is allowed iff its flag is clear.  When model ``m``'s budget first reaches 0 (before the
       first step for a budget that starts at 0), ``K`` is set for every pair of live groups
       both belonging to ``m``.
    4. Until ``r`` groups remain: take the allowed pair ``p < q`` of current groups with the
       largest ``C[p, q]`` (ties: smallest ``p``, then smallest ``q``) and fold ``q`` into
       ``p``: ``C[p, j] = C[j, p] = alpha * min(C[p, j], C[q, j])`` and ``K(p, j) = K(p, j) or
       K(q, j)`` for every other group ``j``; ``q``'s row and column disappear.  The factor is
       1 instead of ``alpha`` where the new ``p`` and ``j`` each hold at most one unit per
       model and share no model (a unit matched across three or more models; never with two
       models: a folded group covers both).  A same-model fold spends one unit of that
       model's budget.
    5. If no allowed pair remains while more than ``r`` groups do, the flags are lifted for the
       rest of the run (every pair allowed, budgets no longer counted); logged at debug level.
    6. ``U`` [d, r] is the 0/1 membership matrix (merged units ordered by their group's lowest
       index), ``M = U.T`` with rows divided by group sizes; split by model.  ``sum_i M_i U_i
       = I_r``.

    This is ZipIt!'s and HET's rule (but for the undamped folds of three or more models, which
    let N permuted copies of a model zip back into it): their score matrix holds ``-inf``
    where ``K`` is set, and the ``alpha * min`` update spreads it exactly as the ``or`` does.
    So a group of model 0 that absorbed a unit of model 1 after model 1's budget ran out may
    not absorb another group of model 1 that was live then (with ``beta=0``: no merged unit
    holds two units of one model, unless the flags are lifted).

    Args:
        corr: [d, d] correlation, units ordered model 0 first.
        widths: ``d_i`` per model (any, may differ).
        r: merged width, default ``max(widths)``.
        alpha: in [0, 1], damping of a merged group's correlations (ZipIt! uses 0.5).
        beta: >= 0, scale of the within-model budgets.
        candidates: 0 (default): the exact greedy (:func:`zip_groups`); ``k >= 1``: the
            variant on each group's ``k`` best partners (:func:`zip_groups_candidates`, not
            exact; e.g. :data:`DEFAULT_CANDIDATES`), which never copies ``corr``.
        overwrite: ``corr`` (a float64 tensor, exactly symmetric, e.g. a correlation from
            moments) is the caller's to overwrite: the exact greedy keeps its scores in
            ``corr``'s upper triangle instead of a copy (NaN set to 0 in place); the lower
            triangle keeps the correlations (``corr.T`` is what ``corr`` was).  Same groups.

    ``corr`` may be a numpy array or a torch tensor; the scores are built on its device.  Cost:
    exact, a float64 copy of ``corr`` (O(d^2) memory) and :func:`zip_groups`' time; with
    candidates, no copy, one pass over ``corr`` and about O(k) per merge.  Both build the
    dense M_i, U_i (O(d r)).
    """
    ws = _check_widths(widths)
    d = sum(ws)
    r = _check_r(r, d, max(ws))
    alpha, beta = _check_alpha_beta(alpha, beta)
    if candidates:
        c = _check_corr(corr, d)
        groups = zip_groups_candidates(c, ws, r, alpha, beta, candidates)
        log.debug("zip: %d units matched on %d candidates per group (not exact)", d,
                  candidates)
    elif overwrite:
        c = _scratch_scores(corr, d)
        groups = _Zipper(c.cpu().numpy(), ws, r, alpha, beta).run()
        return _match_from_groups(c.mT, ws, groups)  # the lower triangle: never written
    else:
        scores, ws, r, alpha, beta = _prepare_scores(corr, ws, r, alpha, beta, symmetric=True)
        groups = _Zipper(scores.cpu().numpy(), ws, r, alpha, beta).run()
        del scores
    return _match_from_groups(corr, ws, groups)


def _scratch_scores(corr: object, d: int) -> torch.Tensor:
    """``corr`` checked (:func:`_check_corr`) as the zip's own score matrix: a float64
    tensor, exactly symmetric, its NaN set to 0 in place (the diagonal is never read)."""
    c = _check_corr(corr, d)
    if not isinstance(corr, torch.Tensor) or c.dtype != torch.float64:
        raise ConfigError("zip_match(overwrite=True) needs a float64 torch tensor")
    if not bool(torch.isfinite(c.sum())):
        c.nan_to_num_(nan=0.0)
    if not torch.equal(c[:_TILE], c[:, :_TILE].T):  # a cheap look: a matrix from moments is
        raise DataError("zip_match(overwrite=True) needs an exactly symmetric correlation")
    return c


# --------------------------------------------------------------------------------------------
# ZipIt on candidate pairs: the faster variant for very wide spaces
# --------------------------------------------------------------------------------------------

#: candidates per group of the faster variant, a good default (benchmarks/speed.py --matcher)
DEFAULT_CANDIDATES = 32


class _CandidateZipper:
    """ZipIt's rule (:func:`zip_match`) on a sparse set of candidate pairs: every group's
    ``k`` best partners, kept in a heap; see :func:`zip_groups_candidates`."""

    def __init__(self, c: torch.Tensor, ws: list[int], r: int, alpha: float, beta: float,
                 k: int) -> None:
        d = sum(ws)
        self.c, self.d, self.r, self.alpha, self.k = c, d, r, alpha, k
        self.host = c.cpu().numpy() if c.device.type == "cpu" else None  # a view, no copy
        self.model = np.repeat(np.arange(len(ws)), ws)
        self.budget = zip_budgets(ws, r, beta)
        self.members: list[list[int]] = [[i] for i in range(d)]
        self.mult: list[np.ndarray] = [np.ones(1) for _ in range(d)]  # alpha^(folds), per member
        self.many = len(ws) > 2  # only then may a fold go undamped (`_damping`)
        self.count = np.zeros((d, len(ws)), dtype=np.int64)  # units per model of each group
        self.count[np.arange(d), self.model] = 1
        self.carries: list[set[int]] = [set() for _ in range(d)]
        self.alive = np.ones(d, dtype=bool)
        self.nb: list[dict[int, float]] = [{} for _ in range(d)]  # candidate partner -> score
        self.heap: list[tuple[float, int, int]] = []
        self.held: list[tuple[float, int, int]] = []  # forbidden when popped, kept for a lift
        self.lifted = False
        self.n_groups = d

    def entries(self, rows: list[int], cols: list[int]) -> np.ndarray:
        """C0[rows][:, cols] as float64 on the host, NaN -> 0."""
        if self.host is not None:
            sub = self.host[np.ix_(rows, cols)]
        else:
            at = torch.tensor(rows, device=self.c.device), torch.tensor(cols, device=self.c.device)
            sub = self.c[at[0]][:, at[1]].to("cpu", torch.float64).numpy()
        return np.nan_to_num(sub.astype(np.float64, copy=False), nan=0.0)

    def scores(self, g: int, others: list[int]) -> list[float]:
        """C(g, h) for each h in others: min over members u, v of mult_u mult_v C0[u, v]; the
        plain min where g and h are apart (`_damping`: every fold that made them was)."""
        cols = [v for h in others for v in self.members[h]]
        plain = self.entries(self.members[g], cols)
        mult = np.concatenate([self.mult[h] for h in others])
        cut = np.cumsum([0] + [len(self.members[h]) for h in others])
        worst = np.minimum.reduceat((plain * self.mult[g][:, None] * mult[None, :]).min(axis=0),
                                    cut[:-1])
        mine = self.count[g] > 0
        if not self.many or self.count[g].max() > 1 or mine.all():
            return [float(x) for x in worst]
        count = self.count[others]
        apart = (count.max(axis=1) <= 1) & ~(count[:, mine] > 0).any(axis=1)
        if apart.any():
            worst = np.where(apart, np.minimum.reduceat(plain.min(axis=0), cut[:-1]), worst)
        return [float(x) for x in worst]

    def link(self, g: int, h: int, s: float) -> None:
        p, q = min(g, h), max(g, h)
        self.nb[p][q] = s
        self.nb[q][p] = s
        heapq.heappush(self.heap, (-s, p, q))

    def refill(self) -> None:
        """Every live group's ``k`` best live partners become candidates (exact scores): one
        pass over ``C0`` by blocks of units, on its device."""
        live = np.flatnonzero(self.alive)
        head = np.empty(self.d, dtype=np.int64)
        mult = np.empty(self.d)
        for g in live:
            head[self.members[g]] = g
            mult[self.members[g]] = self.mult[g]
        singles = all(len(self.members[g]) == 1 for g in live)
        if not singles:  # few groups are merged when the candidates run out: score them all
            for g in live:
                others = [int(h) for h in live if h != g and int(h) not in self.nb[g]]
                for h, s in zip(others, self.scores(int(g), others) if others else []):
                    self.link(int(g), h, s)
            return
        dev = self.c.device
        idx = torch.from_numpy(live).to(dev)
        kk = min(self.k, len(live) - 1)
        found = []
        for a in range(0, len(live), _TILE):
            n = min(_TILE, len(live) - a)
            val, at = self.best(idx, a, n, kk, len(live) == self.d)
            found.append((np.repeat(live[a:a + n], kk), live[at].ravel(), val.ravel()))
        g, h, val = (np.concatenate(x) for x in zip(*found))
        p, q = np.minimum(g, h), np.maximum(g, h)
        keep = val > -math.inf
        pairs, first = np.unique(p[keep] * self.d + q[keep], return_index=True)
        val = val[keep][first]
        p, q = divmod(pairs, self.d)
        fresh = [(-float(x), int(a), int(b)) for x, a, b in zip(val, p, q)
                 if int(b) not in self.nb[int(a)]]
        for s, a, b in fresh:
            self.nb[a][b] = -s
            self.nb[b][a] = -s
        self.heap.extend(fresh)
        heapq.heapify(self.heap)

    def best(self, idx: torch.Tensor, a: int, n: int, kk: int, whole: bool
             ) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``a:a + n`` of the live groups: their ``kk`` largest scores among the live
        groups (NaN read as 0, never the group itself) and where they are.  With every unit
        live (the start), the rows are read in place: ``kk + 1`` largest, the diagonal
        dropped."""
        dev = self.c.device
        if whole and kk < self.d:
            val, at = self.c[a:a + n].topk(kk + 1, dim=1)
            if not bool(torch.isnan(val).any()):
                val, at = val.to(torch.float64).cpu().numpy(), at.cpu().numpy()
                own = at == np.arange(a, a + n)[:, None]
                drop = np.where(own.any(axis=1), own.argmax(axis=1), kk)  # self, else last
                keep = np.ones_like(own)
                keep[np.arange(n), drop] = False
                return val[keep].reshape(n, kk), at[keep].reshape(n, kk)
        block = self.c[idx[a:a + n]][:, idx].to(torch.float64).nan_to_num_(nan=0.0)
        block[torch.arange(n, device=dev), torch.arange(a, a + n, device=dev)] = -math.inf
        val, at = block.topk(kk, dim=1)  # ties: any order; the heap orders them
        return val.cpu().numpy(), at.cpu().numpy()

    def allowed(self, p: int, q: int) -> bool:
        return self.lifted or not (self.carries[p] & self.carries[q])

    def flag(self, m: int) -> None:
        for g in np.flatnonzero(self.alive & (self.model == m)):
            self.carries[g].add(m)

    def pop(self) -> tuple[int, int] | None:
        """The best live allowed candidate pair (ties: smallest p, then q); None if none."""
        while self.heap:
            s, p, q = heapq.heappop(self.heap)
            if not (self.alive[p] and self.alive[q]) or self.nb[p].get(q) != -s:
                continue  # stale
            if not self.allowed(p, q):
                self.held.append((s, p, q))
                continue
            return p, q
        return None

    def fold(self, p: int, q: int) -> None:
        """q into p: members, flags, budget, and p's candidates with their new scores."""
        self.alive[q] = False
        self.n_groups -= 1
        near = (set(self.nb[p]) | set(self.nb[q])) - {p, q}
        old_p, old_q = self.nb[p], self.nb[q]
        for j in (set(old_p) | set(old_q)):
            self.nb[j].pop(p, None)
            self.nb[j].pop(q, None)
        near = sorted(j for j in near if self.alive[j])
        miss_p = [j for j in near if j not in old_p]
        miss_q = [j for j in near if j not in old_q]
        known_p = dict(zip(miss_p, self.scores(p, miss_p))) if miss_p else {}
        known_q = dict(zip(miss_q, self.scores(q, miss_q))) if miss_q else {}
        self.members[p] = self.members[p] + self.members[q]
        self.mult[p] = np.concatenate([self.mult[p], self.mult[q]]) * self.alpha
        self.members[q], self.mult[q] = [], np.ones(0)
        self.count[p] += self.count[q]
        self.carries[p] |= self.carries[q]
        self.nb[p], self.nb[q] = {}, {}
        damp = _damping(self.count, p, self.alpha) if self.many else self.alpha
        per = damp.tolist() if np.ndim(damp) else None  # (plain floats: the heap compares them)
        new = [((per[j] if per else damp) * min(old_p.get(j, known_p.get(j)),
                                                 old_q.get(j, known_q.get(j))), j) for j in near]
        for sc, j in heapq.nlargest(self.k, new, key=lambda x: (x[0], -x[1])):
            self.link(p, j, sc)  # the k best partners stay candidates
        if self.model[p] == self.model[q] and not self.lifted:
            m = int(self.model[p])
            self.budget[m] -= 1
            if self.budget[m] == 0:
                self.flag(m)

    def run(self) -> list[list[int]]:
        for m in np.flatnonzero(self.budget <= 0):
            self.flag(int(m))
        self.refill()
        while self.n_groups > self.r:
            pair = self.pop()
            if pair is None:
                self.refill()
                pair = self.pop()
            if pair is None:
                self.lifted = True
                log.debug("zip (candidates): no allowed pair left with %d groups > r=%d; "
                          "lifting the within-model budgets", self.n_groups, self.r)
                for item in self.held:
                    heapq.heappush(self.heap, item)
                self.held = []
                continue
            self.fold(*pair)
        return [sorted(self.members[i]) for i in np.flatnonzero(self.alive)]


def zip_groups_candidates(
    C: np.ndarray | torch.Tensor, widths: Sequence[int], r: int, alpha: float = 0.5,
    beta: float = 1.0, k: int = DEFAULT_CANDIDATES,
) -> list[list[int]]:
    """ZipIt grouping on candidate pairs: the faster variant of :func:`zip_groups` for very
    wide spaces (not exact).

    The rule is :func:`zip_match`'s, except that only *candidate* pairs of groups are
    considered: at first each unit's ``k`` most correlated units (its row of ``C``, on
    ``C``'s device, by blocks of rows); a fold gives the merged group the ``k`` best of both
    groups' candidates, scored (``C(G, H) = min`` over members ``u, v`` of ``alpha^(folds of
    u) alpha^(folds of v) C[u, v]``, which is what the repeated ``alpha * min`` makes, or the
    plain min for groups apart in :func:`_damping`'s sense, read from ``C`` for the partners
    only one of them had; groups of three or more models that were apart for some of their
    folds only are scored as if every fold was damped).  When no candidate
    pair is left, every live group's candidates are scored again among all live groups
    (then the flags are lifted as in the exact rule).  Pairs are taken best first from a
    heap (ties: smallest ``p``, then ``q``), so where every pair the exact greedy takes is a
    candidate the result is the exact one.  ``C`` is read, never copied: time O(d^2 / tile)
    for the candidates and about O(k) per merge, memory O(d k).  Reads rows of ``C``: pass
    a symmetric matrix.
    """
    ws = _check_widths(widths)
    d = sum(ws)
    c = _as_tensor(C)
    if tuple(c.shape) != (d, d):
        raise DataError(f"C has shape {tuple(c.shape)} but the widths {ws} sum to d={d}; pass "
                        "[d, d]")
    r = _check_r(r, d, d)
    alpha, beta = _check_alpha_beta(alpha, beta)
    try:
        k = operator.index(k)
    except TypeError as exc:
        raise ConfigError(f"candidates must be a positive integer, got {k!r}") from exc
    if k < 1:
        raise ConfigError(f"candidates must be >= 1, got {k}")
    return _CandidateZipper(c, ws, r, alpha, beta, k).run()


@dataclass(frozen=True)
class Matcher:
    """A registered matcher: its function, the options it accepts (with defaults), and whether
    it is elastic (accepts any merged width ``r``; otherwise widths must be equal)."""

    name: str
    fn: Callable[..., Match]
    options: dict[str, object]
    elastic: bool
    overwrites: bool = False  # fn takes overwrite=True: corr is its scratch (zip_match)

    def check_options(self, options: dict[str, object]) -> None:
        """ConfigError for an option this matcher does not accept, or a bad value."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "no options"
            raise ConfigError(f"method={self.name!r} does not take {', '.join(unknown)}; it "
                              f"accepts {accepted}")
        if "alpha" in options or "beta" in options:
            _check_alpha_beta(options.get("alpha", 0.5), options.get("beta", 1.0))

    def __call__(self, corr: np.ndarray, widths: Sequence[int], r: int | None = None,
                 overwrite: bool = False, **options: object) -> Match:
        """The match of one space. ``overwrite``: ``corr`` (a float64 tensor, exactly
        symmetric) is the caller's scratch, for a matcher that can use it (``overwrites``):
        its upper triangle may be overwritten, its lower one is kept."""
        self.check_options(options)
        if overwrite and self.overwrites:
            options = {**options, "overwrite": True}
        return self.fn(corr, widths, r, **options)


MATCHERS: dict[str, Matcher] = {m.name: m for m in (
    Matcher("zip", zip_match, {"alpha": 0.5, "beta": 1.0}, elastic=True, overwrites=True),
    Matcher("permute", hungarian_match, {}, elastic=False),
    Matcher("average", average_match, {}, elastic=False),
)}


def get_matcher(name: str) -> Matcher:
    """The matcher registered as ``name``; ConfigError listing the valid names otherwise."""
    try:
        return MATCHERS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown matcher {name!r}; valid names: {', '.join(sorted(MATCHERS))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Correlation from streamed moments
# --------------------------------------------------------------------------------------------


def correlation_from_moments(
    sum_x: np.ndarray | torch.Tensor,
    sum_xx: np.ndarray | torch.Tensor,
    n: int,
    eps: float = 1e-10,
    widths: Sequence[int] | None = None,
    tie_break: float = 0.0,
) -> np.ndarray | torch.Tensor:
    """Pearson correlation [d, d] (float64) from streamed sums; constant units paired by value.

    Args:
        sum_x: ``sum_t x_t``, shape [d].
        sum_xx: ``sum_t x_t x_t^T``, shape [d, d]; only its upper triangle is read (the
            lower one may hold anything).
        n: number of samples summed, >= 1.
        eps: relative tolerance for constant units (below).
        widths: ``d_i`` per model when the units of several models are stacked: the scale of
            a unit is then that of its own model's units.  None: one model.
        tie_break: >= 0; each correlation is lowered by ``tie_break * gap / size`` (at most
            ``tie_break``), ``gap = |mean_i - mean_j| + |std_i - std_j|`` and ``size =
            (|mean_i| + std_i) + (|mean_j| + std_j)``: exact ties go to units of equal mean and
            spread; the result stays exactly symmetric.

    A unit is *constant* on the data when its variance is at most ``eps`` times the larger of
    its own ``E[x^2]`` (a large mean: the cancellation in ``E[x^2] - E[x]^2`` leaves a
    rounding residue) and its model's mean unit variance (a unit that only carries the
    rounding noise of the computation around a value near 0).  A unit that is 0 on every
    sample is constant.  Its value is its mean, known to ``s = sqrt(eps * that scale)``; two
    constant units whose values differ by at most ``s_i + s_j`` are equal.

    A constant unit correlates 1 with every constant unit of equal value (itself included):
    merging them changes nothing on the data, e.g. a dead ReLU unit and its twin in a permuted
    copy.  It correlates 0 with every other unit, so zip never prefers it to a real pair of
    varying units.  Other units get Pearson correlations, 1 on the diagonal, clipped to
    [-1, 1].  Accumulate the sums in float64: float32 sums lose the variance of units with a
    large mean.  Cost O(d^2), on the device of ``sum_xx`` (torch, by blocks of rows: one
    [d, d] output, no other d x d temporary); a tensor in gives a tensor out, an array an
    array.

    Example:
        >>> x = np.array([[1.0, 0.0, 2.0, 0.0], [2.0, 0.0, 4.0, 0.0], [4.0, 0.0, 8.0, 0.0]])
        >>> correlation_from_moments(x.sum(0), x.T @ x, 3, widths=[2, 2]).round(6)
        array([[1., 0., 1., 0.],
               [0., 1., 0., 1.],
               [1., 0., 1., 0.],
               [0., 1., 0., 1.]])
    """
    sx, sxx, ws, n, eps = _check_moments(sum_x, sum_xx, n, eps, widths)
    corr = _correlation_tensor(sx, sxx, ws, n, eps, float(tie_break))
    return corr if isinstance(sum_xx, torch.Tensor) else corr.numpy()


def correlation_in_place(sum_x: torch.Tensor, sum_xx: torch.Tensor, n: int,
                         eps: float = 1e-10, widths: Sequence[int] | None = None,
                         tie_break: float = 0.0) -> torch.Tensor:
    """:func:`correlation_from_moments` written over ``sum_xx`` (a float64 tensor, returned):
    the same values, bit for bit, without a second [d, d] tensor."""
    if not (isinstance(sum_xx, torch.Tensor) and sum_xx.dtype == torch.float64):
        raise ConfigError("correlation_in_place needs sum_xx as a float64 torch tensor")
    sx, sxx, ws, n, eps = _check_moments(sum_x, sum_xx, n, eps, widths)
    return _correlation_tensor(sx, sxx, ws, n, eps, float(tie_break), in_place=True)


def _correlation_tensor(sx: torch.Tensor, sxx: torch.Tensor, ws: list[int], n: int,
                       eps: float = 1e-10, tie_break: float = 0.0,
                       in_place: bool = False) -> torch.Tensor:
    """:func:`correlation_from_moments` on checked float64 tensors, on their device, written
    into one new [d, d] tensor by blocks of rows (O(block * d) temporaries, no other d x d
    copy).  ``tie_break > 0`` lowers each correlation by at most ``tie_break`` as units'
    means and spreads differ (``SpaceStats.correlation``).  ``in_place``: written over
    ``sxx`` itself (no new [d, d] tensor).  Either way only ``sxx``'s upper triangle is read
    (its lower one may hold anything): each block of rows is computed from column ``a`` on,
    and its left part mirrored from the rows above (the result is exactly symmetric, and the
    same, bit for bit, in place or not)."""
    d = sx.numel()
    mean = sx / n
    second_diag = (sxx.diagonal() + sxx.diagonal()) / (2.0 * n)
    var = torch.clamp(second_diag - mean * mean, min=0.0)
    off = _offsets(ws)
    typical = torch.repeat_interleave(
        torch.stack([var[a:b].mean() for a, b in itertools.pairwise(off)]),
        torch.tensor(ws, device=sx.device))
    scale = torch.maximum(second_diag, typical)
    live = var > eps * scale
    std = torch.sqrt(torch.where(live, var, torch.ones_like(var)))
    dead = torch.nonzero(~live).flatten()
    spread = torch.sqrt(torch.clamp(sxx.diagonal() / n - mean ** 2, min=0.0))
    units = _Units(mean, std, dead, scale, spread, eps, tie_break)
    corr = sxx if in_place else torch.empty((d, d), dtype=torch.float64, device=sx.device)
    work = torch.empty((2, min(_TILE, d), d), dtype=torch.float64, device=sx.device)
    for a in range(0, d, _TILE):
        b = min(a + _TILE, d)
        tile, tmp, tmp2 = corr[a:b, a:], work[0, :b - a, :d - a], work[1, :b - a, :d - a]
        if not in_place:
            tile.copy_(sxx[a:b, a:])
        own = tile[:, :b - a]  # the tile's diagonal block: its lower part from its upper one
        own.copy_(torch.triu(own) + torch.triu(own, 1).mT)
        tile += tile  # sxx[i, j] + sxx[j, i] of a symmetric sxx, read above the diagonal
        _finish_tile(tile, a, a, n, live, units, tmp, tmp2)
        if a:
            _transposed(corr, a, b, a, corr[a:b])  # the left part: rows above, transposed
    return corr


@dataclass(frozen=True)
class _Units:
    """Per-unit moments of :func:`_correlation_tensor`."""

    mean: torch.Tensor
    std: torch.Tensor
    dead: torch.Tensor
    scale: torch.Tensor
    spread: torch.Tensor
    eps: float
    tie_break: float


def _finish_tile(tile: torch.Tensor, a: int, c0: int, n: int, live: torch.Tensor, u: _Units,
                 tmp: torch.Tensor, tmp2: torch.Tensor) -> None:
    """Rows ``a:a + len(tile)``, columns ``c0:`` of the correlation, in place, from the sums
    ``sxx[i, j] + sxx[j, i]`` in ``tile``; ``tmp``, ``tmp2``: scratch of the tile's shape."""
    b = a + tile.shape[0]
    mean, std, dead = u.mean, u.std, u.dead
    tile /= 2.0 * n
    tile -= torch.outer(mean[a:b], mean[c0:], out=tmp)
    tile /= torch.outer(std[a:b], std[c0:], out=tmp)
    if dead.numel():
        tile[:, dead[dead >= c0] - c0] = 0.0
        tile[(dead[(dead >= a) & (dead < b)] - a)] = 0.0
    tile.clamp_(-1.0, 1.0)
    rows = torch.nonzero(live[a:b]).flatten()
    tile[rows, rows + a - c0] = 1.0
    _pair_constant_units(tile, a, c0, dead, mean, u.scale, u.eps)
    if u.tie_break > 0.0:  # tie_break * gap / size, in place in two scratch tiles
        spread = u.spread
        torch.sub(mean[a:b, None], mean[None, c0:], out=tmp).abs_()
        tmp += torch.sub(spread[a:b, None], spread[None, c0:], out=tmp2).abs_()
        size = mean.abs() + spread  # (|m_i| + s_i) + (|m_j| + s_j): exactly symmetric
        torch.add(size[a:b, None], size[None, c0:], out=tmp2)
        tmp *= u.tie_break
        tile -= tmp.div_(tmp2.clamp_(min=1e-12))


def _check_moments(
    sum_x: np.ndarray | torch.Tensor, sum_xx: np.ndarray | torch.Tensor, n: int, eps: float,
    widths: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor, list[int], int, float]:
    """Validate the arguments of :func:`correlation_from_moments`; return the sums as float64
    tensors on the device of ``sum_xx`` (no copy where they are already), the widths, ``n`` as
    an int and ``eps`` as a float.  The finiteness check reads Σx and the diagonal of Σxxᵀ
    (a unit's NaN or inf shows in its Σx²)."""
    sxx = torch.as_tensor(sum_xx).to(torch.float64)
    sx = torch.as_tensor(sum_x).to(sxx.device, torch.float64)
    if sx.dim() != 1 or tuple(sxx.shape) != (sx.numel(), sx.numel()):
        raise DataError(
            f"sum_x must be [d] and sum_xx [d, d]; got {tuple(sx.shape)} and "
            f"{tuple(sxx.shape)}"
        )
    d = sx.numel()
    ws = [d] if widths is None else _check_widths(widths)
    if sum(ws) != d:
        raise DataError(f"widths {ws} sum to {sum(ws)} but the moments have d={d} units")
    try:
        n = operator.index(n)
    except TypeError as exc:
        raise ConfigError(f"n must be the integer sample count, got {n!r}") from exc
    if n < 1:
        raise DataError(f"n={n}: no samples were accumulated; feed data before correlating")
    if not bool(torch.isfinite(sx).all() and torch.isfinite(sxx.diagonal()).all()):
        raise DataError("sum_x / sum_xx contain NaN or inf; check the features fed in")
    eps = float(eps)
    if not (math.isfinite(eps) and 0.0 <= eps < 1.0):
        raise ConfigError(f"eps must be in [0, 1), got {eps}")
    return sx, sxx, ws, n, eps


def _transposed(c: torch.Tensor, a: int, b: int, stop: int, out: torch.Tensor) -> None:
    """``out[:, :stop] = c[:stop, a:b].T``, copied by blocks of ``_BLOCK`` rows of ``c`` (a
    whole transposed strip at once reads across memory, several times slower)."""
    for k in range(0, stop, _BLOCK):
        e = min(k + _BLOCK, stop)
        out[:, k:e] = c[k:e, a:b].T


def _pair_constant_units(tile: torch.Tensor, a: int, c0: int, dead: torch.Tensor,
                         mean: torch.Tensor, scale: torch.Tensor, eps: float) -> None:
    """In place, on the rows ``a:a + len(tile)``, columns ``c0:`` of the correlation: 1
    between constant units whose means agree within ``s_i + s_j``, ``s = sqrt(eps * scale)``
    (the precision their values are known to), else 0."""
    rows = dead[(dead >= a) & (dead < a + tile.shape[0])]
    cols = dead[dead >= c0]
    if rows.numel():
        m = mean[cols]
        s = torch.sqrt(eps * scale[cols])
        same = ((mean[rows, None] - m[None, :]).abs()
                <= torch.sqrt(eps * scale[rows])[:, None] + s[None, :])
        tile[(rows - a)[:, None], (cols - c0)[None, :]] = same.to(tile.dtype)

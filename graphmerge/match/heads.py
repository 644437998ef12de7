"""Head-aware matching: attention heads are matched as wholes, and each pair of heads by its
own transform inside the head.

A projection laid out heads × head dim (`SpaceTable.heads`) may only be transformed by a block
transform: a merge of whole heads, then, inside each merged head, a transform of the head dim
that queries and keys share (and another that values and the output projection share). Given
the feature correlations of the projections of every model (one matrix per head dim: the
queries' and keys' activations together, the values' and the output projection's inputs
together), `match_heads`

1. scores every pair of heads (of any models) by how well their dims can be paired: for each
   head dim, the mean correlation of the best one-to-one pairing of the two heads' dims
   (Hungarian), summed over the head dims;
2. merges heads with the configured matcher on those scores (averaging, Hungarian, or zip,
   elastic: the merged model may have another number of heads);
3. inside each merged head, pairs every member head's dims with the first member's
   (Hungarian again), and builds, per model, the merge matrix of the whole projection axis
   (rows: merged head × dim; columns: the model's head × dim) from the head weights and those
   pairings, and the unmerge matrix likewise.

A head dim may be `shared`: one transform for every head (the units of one group of a grouped
convolution, which its weight reads alike in every group). Each model's dims are then paired
once with model 0's, on the correlations summed over the merged heads, and the head dim gets a
permutation per model (`HeadMatch.dims`).

Head dims keep their width. Cost: one Hungarian problem of size head dim per pair of heads
per head dim, plus the matcher on the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from graphmerge.match.matchers import Match

__all__ = ["HeadMatch", "match_heads", "grouped"]


@dataclass
class HeadMatch:
    """The heads' match and, per head dim, each model's merge and unmerge matrices of the
    projection axis (heads × dim)."""

    heads: Match
    merge: list[list[np.ndarray]]     # [head dim][model] -> [r_heads · dim, heads_i · dim]
    unmerge: list[list[np.ndarray]]   # [head dim][model] -> [heads_i · dim, r_heads · dim]
    # [head dim] -> per model, the permutation [dim, dim] of a shared head dim (else None)
    dims: list[list[np.ndarray] | None] | None = None


def _block(corr: np.ndarray, offsets: Sequence[int], dim: int, a: tuple[int, int],
           b: tuple[int, int]) -> np.ndarray:
    ra = offsets[a[0]] + a[1] * dim
    rb = offsets[b[0]] + b[1] * dim
    return corr[ra:ra + dim, rb:rb + dim]


def _pairing(block: np.ndarray) -> tuple[np.ndarray, float]:
    """cols[k]: the column paired with row k, maximising the summed correlation; its mean."""
    rows, cols = linear_sum_assignment(np.nan_to_num(block), maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out, float(np.nan_to_num(block)[rows, cols].mean())


def match_heads(corrs: Sequence[np.ndarray], heads: Sequence[int], dims: Sequence[int],
                matcher: Callable[..., Match], r: int | None = None,
                fixed: Sequence[bool] = (), shared: Sequence[bool] = (), **options) -> HeadMatch:
    """Match the heads of N models (see the module docstring).

    Args:
        corrs: per head dim, the correlation matrix of the concatenated units of every model
            (model-major, then head, then dim): [Σ_i heads_i · dims[j]]².
        heads: heads_i per model.
        dims: the width of each head dim (equal across models).
        matcher: a registered matcher (`graphmerge.match.matchers`) run on the head scores.
        r: the merged number of heads (None: the matcher's default).
        fixed: per head dim, whether it keeps the identity (a rotary embedding's query/key
            dims, a dim with a per-head norm): dim e of one head pairs with dim e of another.
        shared: per head dim, whether one transform moves it in every head (see above).
    """
    fixed = list(fixed) or [False] * len(dims)
    shared = list(shared) or [False] * len(dims)

    def pairing(j: int, a: tuple[int, int], b: tuple[int, int]) -> tuple[np.ndarray, float]:
        block = _block(corrs[j], offsets[j], dims[j], a, b)
        if fixed[j]:
            return np.arange(dims[j]), float(np.nan_to_num(np.diag(block)).mean())
        return _pairing(block)

    units = [(i, h) for i, n in enumerate(heads) for h in range(n)]
    offsets = [[int(x) for x in np.cumsum([0] + [n * d for n in heads[:-1]])] for d in dims]
    score = np.zeros((len(units), len(units)))
    for a in range(len(units)):
        for b in range(a, len(units)):
            total = sum(pairing(j, units[a], units[b])[1] for j in range(len(dims)))
            score[a, b] = score[b, a] = total / len(dims)
    match = matcher(score, list(heads), r, **options)
    width = match.merge[0].shape[0]
    merge = [[np.zeros((width * d, n * d)) for n in heads] for d in dims]
    unmerge = [[np.zeros((n * d, width * d)) for n in heads] for d in dims]
    members = [[(i, h) for i, n in enumerate(heads) for h in range(n)
                if match.merge[i][g, h] != 0 or match.unmerge[i][h, g] != 0]
               for g in range(width)]
    common = [_shared_pairings(corrs[j], offsets[j], d, len(heads), members)
              if shared[j] and not fixed[j] else None for j, d in enumerate(dims)]
    for g in range(width):
        first = members[g][0]
        for j, d in enumerate(dims):
            for i, h in members[g]:
                # dim e of the merged head is dim cols[e] of this member
                cols = (common[j][i] if common[j] is not None else np.arange(d)
                        if (i, h) == first else pairing(j, first, (i, h))[0])
                rows = g * d + np.arange(d)
                merge[j][i][rows, h * d + cols] = match.merge[i][g, h]
                unmerge[j][i][h * d + cols, rows] = match.unmerge[i][h, g]
    perms = [None if c is None else [np.eye(d)[cols] for cols in c]
             for c, d in zip(common, dims)]
    return HeadMatch(match, merge, unmerge, perms)


def _shared_pairings(corr: np.ndarray, offsets: Sequence[int], dim: int, n_models: int,
                     members: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """Per model, cols[e]: its dim paired with dim e of model 0, one pairing for every head:
    the correlations of model 0's heads with the model's heads merged into the same head,
    summed (no shared merged head: the identity)."""
    out = [np.arange(dim)]
    for i in range(1, n_models):
        cost = np.zeros((dim, dim))
        for group in members:
            for a in (m for m in group if m[0] == 0):
                for b in (m for m in group if m[0] == i):
                    cost += np.nan_to_num(_block(corr, offsets, dim, a, b))
        out.append(_pairing(cost)[0] if cost.any() else np.arange(dim))
    return out


def grouped(matrix: np.ndarray, dim: int, group: int) -> np.ndarray:
    """A heads × dim block matrix [a · dim, b · dim] as it acts on a layout heads × group ×
    dim (grouped-query attention: each key/value head's queries): the same block for every
    member of a group, the group kept in order. group == 1 returns `matrix`."""
    if group == 1:
        return matrix
    a, b = matrix.shape[0] // dim, matrix.shape[1] // dim
    blocks = matrix.reshape(a, dim, b, dim)
    out = np.einsum("iejc,gh->igejhc", blocks, np.eye(group))
    return out.reshape(a * group * dim, b * group * dim)

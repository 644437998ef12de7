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
3. inside each merged head, pairs every member head's dims with those of its first widest
   member, the reference (Hungarian again, on a rectangular block when the widths differ),
   and builds, per model, the merge matrix of the whole projection axis (rows: merged head ×
   dim; columns: the model's head × dim) from the head weights and those pairings, and the
   unmerge matrix likewise.

Elastic head dims: models may differ in the width of a head dim (a ViT of dim 64 and one of
dim 96, both with 4 heads). The merged head dim is the widest model's; a merged dim averages
the members' dims paired with it, each by its head's merge weight renormalised over the
members that hold that dim, so a dim that only a wider model has keeps that model's unit
alone. A merged head whose members are all narrower leaves its extra dims zero (their queries,
keys and values are zero: q·kᵀ and the output do not change).

A head dim may be `shared`: one transform for every head (the units of one group of a grouped
convolution, which its weight reads alike in every group). Each model's dims are then paired
once with model 0's, on the correlations summed over the merged heads, and the head dim gets a
permutation per model (`HeadMatch.dims`).

Cost: one Hungarian problem of size head dim per pair of heads per head dim, plus the
matcher on the heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from graphmerge.errors import MismatchError
from graphmerge.match.matchers import Match

__all__ = ["HeadMatch", "match_heads", "grouped", "renormalized"]


@dataclass
class HeadMatch:
    """The heads' match and, per head dim, each model's merge and unmerge matrices of the
    projection axis (heads × dim)."""

    heads: Match
    merge: list[list[np.ndarray]]     # [head dim][model] -> [r_heads · D, heads_i · d_i]
    unmerge: list[list[np.ndarray]]   # [head dim][model] -> [heads_i · d_i, r_heads · D]
    # [head dim] -> per model, the merge matrix [D, d_i] of a shared head dim (else None):
    # each merged dim averages the dims paired with it; the unmerge is its pattern
    dims: list[list[np.ndarray] | None] | None = None
    # [head dim] -> the merged width of that head dim (the widest model's)
    widths: list[int] | None = None


def _block(corr: np.ndarray, offsets: Sequence[int], dims: Sequence[int], a: tuple[int, int],
           b: tuple[int, int]) -> np.ndarray:
    """The correlations of head a's dims (rows) with head b's (columns); heads (model, head)."""
    ra = offsets[a[0]] + a[1] * dims[a[0]]
    rb = offsets[b[0]] + b[1] * dims[b[0]]
    return corr[ra:ra + dims[a[0]], rb:rb + dims[b[0]]]


def _pairing(block: np.ndarray) -> tuple[np.ndarray, float]:
    """rows[c]: the row paired with column c, maximising the summed correlation (a one-to-one
    pairing of the narrower side; a column of a wider side left alone gets -1); its mean."""
    block = np.nan_to_num(block)
    rows, cols = linear_sum_assignment(block, maximize=True)
    out = np.full(block.shape[1], -1, dtype=np.int64)
    out[cols] = rows
    return out, float(block[rows, cols].mean()) if len(rows) else 0.0


def match_heads(corrs: Sequence[np.ndarray], heads: Sequence[int],
                dims: Sequence[int | Sequence[int]], matcher: Callable[..., Match],
                r: int | None = None, fixed: Sequence[bool] = (), shared: Sequence[bool] = (),
                **options) -> HeadMatch:
    """Match the heads of N models (see the module docstring).

    Args:
        corrs: per head dim, the correlation matrix of the concatenated units of every model
            (model-major, then head, then dim): [Σ_i heads_i · dims[j][i]]².
        heads: heads_i per model.
        dims: per head dim, its width in every model (a list), or one width for all.
        matcher: a registered matcher (`graphmerge.match.matchers`) run on the head scores.
        r: the merged number of heads (None: the matcher's default).
        fixed: per head dim, whether it keeps the identity (a rotary embedding's query/key
            dims, a dim with a per-head norm): dim e of one head pairs with dim e of another
            (one width in every model).
        shared: per head dim, whether one transform moves it in every head (see above; one
            width in every model).
    """
    n = len(heads)
    widths = [[int(d)] * n if isinstance(d, (int, np.integer)) else [int(w) for w in d]
              for d in dims]
    fixed = list(fixed) or [False] * len(widths)
    shared = list(shared) or [False] * len(widths)
    for j, ws in enumerate(widths):
        if fixed[j] and len(set(ws)) > 1:
            raise MismatchError(f"a head dim that keeps the identity has widths {ws}: only a "
                                f"head dim that is matched may differ in width")

    def pairing(j: int, a: tuple[int, int], b: tuple[int, int]) -> tuple[np.ndarray, float]:
        block = _block(corrs[j], offsets[j], widths[j], a, b)
        if fixed[j]:
            return np.arange(block.shape[1]), float(np.nan_to_num(np.diag(block)).mean())
        return _pairing(block)

    units = [(i, h) for i, k in enumerate(heads) for h in range(k)]
    offsets = [[int(x) for x in np.cumsum([0] + [k * w for k, w in zip(heads[:-1], ws)])]
               for ws in widths]
    score = np.zeros((len(units), len(units)))
    for a in range(len(units)):
        for b in range(a, len(units)):
            total = sum(pairing(j, units[a], units[b])[1] for j in range(len(widths)))
            score[a, b] = score[b, a] = total / len(widths)
    match = matcher(score, list(heads), r, **options)
    width = match.merge[0].shape[0]
    members = [[(i, h) for i, k in enumerate(heads) for h in range(k)
                if match.merge[i][g, h] != 0 or match.unmerge[i][h, g] != 0]
               for g in range(width)]
    common = [_shared_pairings(corrs[j], offsets[j], ws, n, members)
              if shared[j] and not fixed[j] else None for j, ws in enumerate(widths)]
    merge, unmerge = [], []
    for j, ws in enumerate(widths):
        m, u = _elastic_dims(match, members, ws, heads,
                             lambda a, b, j=j: pairing(j, a, b)[0], common[j])
        merge.append(m)
        unmerge.append(u)
    perms = [None if c is None else _shared_merges(c, max(ws))
             for c, ws in zip(common, widths)]
    return HeadMatch(match, merge, unmerge, perms, [max(ws) for ws in widths])


def _elastic_dims(match: Match, members: list[list[tuple[int, int]]], ws: Sequence[int],
                  heads: Sequence[int], pair: Callable, common: list[np.ndarray] | None
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per model, the merge and unmerge matrices of one head dim's projection axis (merged
    head × merged dim by the model's head × dim). The merged dim is the widest model's; in
    each merged head its first widest member is the reference, every other member's dims are
    paired with the reference's (one to one: `pair`), and a merged dim averages the members'
    dims paired with it, each member by its head's merge weight, renormalised over the
    members that hold it (a dim only a wider model has keeps that model's unit alone)."""
    big = max(ws)
    width = match.merge[0].shape[0]
    merge = [np.zeros((width * big, k * w)) for k, w in zip(heads, ws)]
    unmerge = [np.zeros((k * w, width * big)) for k, w in zip(heads, ws)]
    for g in range(width):
        ref = max(members[g], key=lambda m: ws[m[0]])
        rows = []
        for i, h in members[g]:
            # dim c of this member is dim ref_of[c] of the merged head (-1: left alone)
            ref_of = (common[i] if common is not None else np.arange(ws[i]) if (i, h) == ref
                      else pair(ref, (i, h)))
            for c, e in enumerate(ref_of):
                if e >= 0:
                    rows.append((i, h * ws[i] + c, g * big + int(e), match.merge[i][g, h]))
                    unmerge[i][h * ws[i] + c, g * big + int(e)] = match.unmerge[i][h, g]
        total = np.zeros(width * big)
        for _, _, e, w in rows:
            total[e] += w
        for i, col, e, w in rows:
            merge[i][e, col] = w / total[e] if total[e] else 0.0
    return merge, unmerge


def _shared_pairings(corr: np.ndarray, offsets: Sequence[int], ws: Sequence[int],
                     n_models: int, members: list[list[tuple[int, int]]]) -> list[np.ndarray]:
    """Per model, ref_of[c]: the dim of the reference model (the first widest) that its dim c
    is paired with, one pairing for every head: the correlations of the reference's heads
    with the model's heads merged into the same head, summed (no shared merged head: the
    identity)."""
    ref = int(np.argmax(ws))
    out = []
    for i in range(n_models):
        cost = np.zeros((ws[ref], ws[i]))
        for group in members:
            for a in (m for m in group if m[0] == ref):
                for b in (m for m in group if m[0] == i):
                    cost += np.nan_to_num(_block(corr, offsets, ws, a, b))
        out.append(np.arange(ws[i]) if i == ref or not cost.any() else _pairing(cost)[0])
    return out


def _shared_merges(ref_of: list[np.ndarray], width: int) -> list[np.ndarray]:
    """Per model, the merge matrix [width, d_i] of a shared head dim on its own: merged dim e
    averages the models' dims paired with it (a dim only wider models have: theirs)."""
    out = [np.zeros((width, len(r))) for r in ref_of]
    for m, r in zip(out, ref_of):
        m[r, np.arange(len(r))] = 1.0
    holders = sum(m.sum(1) for m in out)
    return [m / np.maximum(holders, 1)[:, None] for m in out]


def grouped(matrix: np.ndarray, dim: int, group: int, merged: int | None = None,
            rows: bool = True, merged_group: int | None = None) -> np.ndarray:
    """A heads × dim block matrix as it acts on a layout heads × group × dim (grouped-query
    attention: each key/value head's queries): the same block for every member of a group,
    the group kept in order. The model's head dim and group are `dim` and `group`, the merged
    ones `merged` and `merged_group` (defaults: the model's; query j of a group is merged
    query j): a merge matrix [a · G · merged, b · group · dim] (`rows`), or an unmerge matrix
    [b · group · dim, a · G · merged]. A group of 1 in both returns `matrix`."""
    merged = dim if merged is None else merged
    big = group if merged_group is None else merged_group
    if group == big == 1:
        return matrix
    if not rows:
        return grouped(matrix.T, dim, group, merged, True, big).T
    a, b = matrix.shape[0] // merged, matrix.shape[1] // dim
    blocks = matrix.reshape(a, merged, b, dim)
    out = np.einsum("iejc,gh->igejhc", blocks, np.eye(big, group))
    return out.reshape(a * big * merged, b * group * dim)


def renormalized(merges: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Merge matrices whose rows, summed over the models, are scaled to 1 (a merged unit
    that only some models hold, as a query slot of a larger group, averages those alone);
    rows no model holds stay zero."""
    total = sum(m.sum(1) for m in merges)
    scale = np.where(total != 0, total, 1.0)[:, None]
    return [m / scale for m in merges]

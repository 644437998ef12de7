"""Orthogonal alignment of one space between two models, from the feature moments already
collected (`match.statistics.SpaceStats`): Q minimising |x_k Q − x_0|² over the calibration
features (orthogonal Procrustes on the cross second moment x_kᵀ x_0), optionally kept to
Q·1 = 1 (solved on the complement of the all-ones direction), and the moments of the rotated
model without a second pass over the data.

On a copy whose space is permuted (x_k = x_0 P) the solution is Pᵀ exactly when the moment is
full rank on the solved subspace; where it is not (its smallest singular value under
`RANK_RTOL` of its largest), the rotation is not unique and the space is left to the
permutation matcher.
"""

from __future__ import annotations

import numpy as np
import torch

from graphmerge.match.statistics import SpaceStats

__all__ = ["RANK_RTOL", "ones_complement", "procrustes", "cross_moment", "rotate_stats"]

#: below this ratio of smallest to largest singular value a cross moment is rank-deficient
RANK_RTOL = 1e-5


def ones_complement(d: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """[d, d−1] orthonormal basis of the vectors orthogonal to the all-ones vector."""
    ones = torch.full((d, 1), d ** -0.5, dtype=dtype, device=device)
    eye = torch.eye(d, dtype=dtype, device=device)[:, :d - 1]
    return torch.linalg.qr(torch.cat([ones, eye], 1))[0][:, 1:]


def procrustes(cross: torch.Tensor, ones: bool) -> tuple[torch.Tensor | None, float]:
    """The orthogonal Q [d, d] maximising tr(Qᵀ cross), cross = x_kᵀ x_0 (float64), with
    Q·1 = 1 if `ones`; and the ratio of the smallest to the largest singular value of the
    moment solved on. Q is None when that ratio is under `RANK_RTOL` (not unique)."""
    d = cross.shape[0]
    basis = ones_complement(d, cross.dtype, cross.device) if ones and d > 1 else None
    m = basis.T @ cross @ basis if basis is not None else cross
    u, s, vh = torch.linalg.svd(m)
    ratio = float(s[-1] / s[0]) if len(s) and float(s[0]) > 0 else 0.0
    if ratio < RANK_RTOL:
        return None, ratio
    r = u @ vh
    if basis is None:
        return r, ratio
    ones_dir = torch.full((d, 1), d ** -0.5, dtype=cross.dtype, device=cross.device)
    return basis @ r @ basis.T + ones_dir @ ones_dir.T, ratio


def cross_moment(stats: SpaceStats, k: int) -> torch.Tensor:
    """x_kᵀ x_0 / n: the second moment (not centred) of model k's features against model 0's."""
    at = np.cumsum([0, *stats.widths])
    return stats.sums()[1][at[0]:at[1], at[k]:at[k + 1]].mT / max(stats.count, 1)


def rotate_stats(stats: SpaceStats, qs: dict[int, torch.Tensor]) -> SpaceStats:
    """The moments after model k's features became x_k Q_k (per k in `qs`): Σx ← Σx Q,
    Σxxᵀ ← Tᵀ Σxxᵀ T with T block-diagonal (identity for the other models). A new object."""
    sum_x, sum_xx = stats.sums()
    at = np.cumsum([0, *stats.widths])
    t = torch.eye(int(at[-1]), dtype=torch.float64, device=sum_x.device)
    for k, q in qs.items():
        t[at[k]:at[k + 1], at[k]:at[k + 1]] = q.to(t)
    sx = (sum_x.reshape(1, -1) @ t).reshape(-1)
    return SpaceStats(list(stats.widths), stats.count, _sx=sx, _sxx=t.T @ sum_xx @ t)

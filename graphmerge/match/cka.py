"""Linear CKA between the units of two models, with the unbiased minibatch HSIC estimator
streamed over calibration batches (Kornblith et al. 2019; Nguyen et al. 2021).

Per batch of n samples, Gram matrices K and L with zeroed diagonals give
HSIC(K, L) = [tr(KL) + 1ᵀK1·1ᵀL1/((n−1)(n−2)) − 2·1ᵀKL1/(n−2)] / (n(n−3));
CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) · mean HSIC(L, L)).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import numpy as np
import torch

from graphmerge.calibration import all_reduce
from graphmerge.errors import ConfigError, DataError

__all__ = ["CKAAccumulator", "linear_cka", "hsic_unbiased", "MIN_BATCH"]

log = logging.getLogger(__name__)

#: Smallest batch the unbiased HSIC estimator is defined for (it divides by n - 3).
MIN_BATCH = 4

# A unit whose mean self-HSIC is below this fraction of its mean ||K||_F^2 / (n(n-3)) is treated
# as constant (no measurable variation): its CKA with every other unit is reported as 0.
_DEGENERATE_RTOL = 1e-10




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
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._device = torch.device("cpu")  # where the features were: all_reduce's tensors

    # -- per-batch work ----------------------------------------------------------------------

    @staticmethod
    def _grams(feats: Sequence[torch.Tensor | np.ndarray], model: str,
               batch: int | None) -> tuple[torch.Tensor, int]:
        """Flattened zero-diagonal Gram matrices ``[units, b*b]`` (float64, on the features'
        device; the CPU for those on MPS, which has no float64) and ``b``."""
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
            grams.append(g.reshape(-1))
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

        A batch of fewer than ``MIN_BATCH`` (4) samples, for which the estimator is not
        defined, is pooled with the next ones until it is large enough.

        Raises:
            DataError: wrong number of units, differing batch sizes, non-finite values.
        """
        if len(feats_a) != self.m or len(feats_b) != self.n:
            raise DataError(f"expected {self.m} unit outputs of model A and {self.n} of model B, "
                            f"got {len(feats_a)} and {len(feats_b)}; pass every unit's output "
                            f"in unit order")
        flat_a = [torch.as_tensor(f).detach().reshape(len(f), -1) for f in feats_a]
        flat_b = [torch.as_tensor(f).detach().reshape(len(f), -1) for f in feats_b]
        if self._pending is not None:
            old_a, old_b = self._pending
            if all(p.shape[1:] == q.shape[1:] for p, q in zip(old_a + old_b, flat_a + flat_b)):
                flat_a = [torch.cat([p, q.to(p.dtype)]) for p, q in zip(old_a, flat_a)]
                flat_b = [torch.cat([p, q.to(p.dtype)]) for p, q in zip(old_b, flat_b)]
            else:
                log.debug("CKA: dropped a pooled partial batch whose feature shapes differ")
            self._pending = None
        if flat_a and len(flat_a[0]) < MIN_BATCH:
            self._pending = (flat_a, flat_b)  # too few samples yet: pool with the next batch
            return
        ga, b = self._grams(flat_a, "A", None)
        gb, _ = self._grams(flat_b, "B", b)
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

        self._device = ga.device
        self._cross += cross.cpu().numpy()
        self._self_a += self_a.cpu().numpy()
        self._self_b += self_b.cpu().numpy()
        self._raw_a += (sq_a * scale).cpu().numpy()
        self._raw_b += (sq_b * scale).cpu().numpy()
        self.batches += 1
        self.samples += b
        log.debug("CKA batch %d: %d samples, %d x %d units", self.batches, b, self.m, self.n)

    def all_reduce(self) -> None:
        """Sum the accumulated HSICs over the processes of torch.distributed (each rank has
        added its own batches; a rank's pooled remainder of < MIN_BATCH samples is dropped).
        The sums travel on the features' device (NCCL reduces only GPU tensors)."""
        arrays = (self._cross, self._self_a, self._self_b, self._raw_a, self._raw_b)
        state = [torch.from_numpy(a).to(self._device) for a in arrays]
        counts = torch.tensor([float(self.batches), float(self.samples)], dtype=torch.float64,
                              device=self._device)
        all_reduce(*state, counts)
        for a, t in zip(arrays, state):
            a[...] = t.cpu().numpy()
        self.batches, self.samples = int(counts[0]), int(counts[1])

    # -- results -----------------------------------------------------------------------------

    def _require(self) -> None:
        if self.batches == 0:
            pooled = len(self._pending[0][0]) if self._pending else 0
            raise DataError(f"the CKA accumulator has {pooled} calibration sample(s); the "
                            f"unbiased estimator needs at least {MIN_BATCH}: pass more "
                            f"calibration data")

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

"""Tests of graphmerge.match.cka, graphmerge.match.align and graphmerge.io.plots: unbiased linear CKA, DP alignment (SMA/LMA/uniform), plot."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphmerge.errors import ConfigError, DataError
from graphmerge.io.plots import plot_alignment
from graphmerge.match.align import ALIGN_METHODS, align, alignment_score, segments
from graphmerge.match.cka import CKAAccumulator, hsic_unbiased, linear_cka

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def hsic_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """The brief's formula, written out literally with explicit ones vectors."""
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    y = y.reshape(y.shape[0], -1).astype(np.float64)
    n = x.shape[0]
    k = x @ x.T
    l = y @ y.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 * (one @ k @ l @ one) / (n - 2)) / (n * (n - 3))


def hsic_u_centered(x: np.ndarray, y: np.ndarray) -> float:
    """Independent route: inner product of U-centred Gram matrices (Székely & Rizzo)."""
    def ucenter(g: np.ndarray) -> np.ndarray:
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0)
        r = g.sum(1)
        u = g - r[:, None] / (n - 2) - r[None, :] / (n - 2) + g.sum() / ((n - 1) * (n - 2))
        np.fill_diagonal(u, 0)
        return u

    n = x.shape[0]
    return float(np.sum(ucenter(x @ x.T) * ucenter(y @ y.T)) / (n * (n - 3)))


def biased_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2
                 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def brute_force(c: np.ndarray, method: str) -> tuple[float, list[int]]:
    """Optimum over all increasing position vectors; first (lexicographically smallest) wins."""
    m, n = c.shape
    if n == 1:
        cands = [(0,)]
    elif method == "sma":
        cands = [(0, *rest) for rest in itertools.combinations(range(1, m), n - 1)]
    else:
        cands = [(0, *mid, m - 1) for mid in itertools.combinations(range(1, m - 1), n - 2)]
    best, best_pos = -np.inf, None
    for pos in cands:
        if method == "sma":
            val = sum(c[l, k] for k, l in enumerate(pos))
        else:
            prev, val = -1, 0
            for k, l in enumerate(pos):
                val += sum(c[r, k] for r in range(prev + 1, l + 1))
                prev = l
        if val > best:
            best, best_pos = val, list(pos)
    return best, best_pos


def features(b: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, d))


# --------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------


def test_hsic_formula_matches_u_centering():
    x, y = features(12, 5, 0), features(12, 3, 1)
    ref = hsic_by_hand(x, y)
    assert hsic_u_centered(x, y) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert hsic_unbiased(x @ x.T, y @ y.T) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_cka_self_is_one():
    x = torch.randn(32, 4, 3, 3)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_orthogonal_and_scale_invariance():
    x, z = features(40, 6, 2), features(40, 6, 3)
    z = z + 0.7 * x  # a non-trivial similarity
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((6, 6)))
    base = linear_cka(x, z)
    assert 0.1 < base < 0.99
    assert linear_cka(x @ q, z) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 3.5 * z @ q.T) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 2.0 * x @ q) == pytest.approx(1.0, abs=1e-10)


def test_cka_unbiased_close_to_biased_on_large_batch():
    b = 1500
    x = features(b, 8, 5)
    y = x @ np.random.default_rng(6).standard_normal((8, 5)) + 0.8 * features(b, 5, 7)
    assert linear_cka(x, y) == pytest.approx(biased_cka(x, y), abs=0.02)


def test_cka_symmetric():
    xs = [torch.randn(16, 5), torch.randn(16, 2, 2), torch.randn(16, 7)]
    ys = [torch.randn(16, 3), xs[0] @ torch.randn(5, 4)]
    ab, ba = CKAAccumulator(3, 2), CKAAccumulator(2, 3)
    ab.update(xs, ys)
    ba.update(ys, xs)
    np.testing.assert_allclose(ab.result(), ba.result().T, rtol=1e-12, atol=1e-12)
    assert linear_cka(xs[0], ys[1]) == pytest.approx(linear_cka(ys[1], xs[0]), abs=1e-12)


def test_cka_streaming_equals_hand_computation():
    rng = np.random.default_rng(8)
    m, n = 3, 2
    acc = CKAAccumulator(m, n)
    cross, sa, sb = np.zeros((m, n)), np.zeros(m), np.zeros(n)
    sizes = [9, 6, 12, 4]
    for b in sizes:
        base = rng.standard_normal((b, 4))
        fa = [base @ rng.standard_normal((4, 3)) + 0.5 * rng.standard_normal((b, 3))
              for _ in range(m)]
        fb = [(base @ rng.standard_normal((4, 6))).reshape(b, 2, 3) for _ in range(n)]
        acc.update([torch.from_numpy(f).float() for f in fa], fb)
        fa32 = [torch.from_numpy(f).float().double().numpy() for f in fa]  # what the acc sees
        for i in range(m):
            sa[i] += hsic_by_hand(fa32[i], fa32[i])
            for j in range(n):
                cross[i, j] += hsic_by_hand(fa32[i], fb[j])
        for j in range(n):
            sb[j] += hsic_by_hand(fb[j], fb[j])
    t = len(sizes)
    expected = (cross / t) / np.sqrt(np.outer(sa / t, sb / t))
    got = acc.result()
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert acc.batches == t and acc.samples == sum(sizes)


def test_cka_shape_and_order():
    x = torch.randn(20, 6)
    a = [x, torch.randn(20, 3), torch.randn(20, 6)]
    b = [torch.randn(20, 2), x.clone()]
    acc = CKAAccumulator(3, 2)
    acc.update(a, b)
    r = acc.result()
    assert r.shape == (3, 2) and r.dtype == np.float64
    assert r[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert abs(r[1, 1]) < 0.9 and abs(r[0, 0]) < 0.9


def test_cka_constant_unit_is_zero(caplog):
    acc = CKAAccumulator(2, 1)
    x = torch.randn(10, 3)
    acc.update([x, torch.ones(10, 3)], [x])
    with caplog.at_level("WARNING", logger="graphmerge.match.cka"):
        r = acc.result()
    assert r[0, 0] == pytest.approx(1.0) and r[1, 0] == 0.0
    assert "constant" in caplog.text


def test_small_batches_are_pooled_until_the_estimator_is_defined():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 5, generator=g), torch.randn(9, 3, generator=g)
    y[:, 0] += 2 * x[:, 0]
    acc = CKAAccumulator(1, 1)
    for lo, hi in ((0, 2), (2, 3), (3, 5), (5, 9)):  # batches of 2, 1, 2, 4 samples
        acc.update([x[lo:hi]], [y[lo:hi]])
    assert acc.batches == 2 and acc.samples == 9  # pooled 2+1+2 = 5, then 4
    pooled = CKAAccumulator(1, 1)
    pooled.update([x[:5]], [y[:5]])
    pooled.update([x[5:]], [y[5:]])
    np.testing.assert_allclose(acc.result(), pooled.result(), rtol=1e-12)


def test_cka_errors():
    acc = CKAAccumulator(1, 1)
    with pytest.raises(DataError, match="0 calibration sample"):
        acc.result()
    acc.update([torch.randn(3, 2)], [torch.randn(3, 2)])  # pooled, not an error
    with pytest.raises(DataError, match="at least 4"):
        acc.result()
    acc = CKAAccumulator(1, 1)
    with pytest.raises(DataError, match="batch size"):
        acc.update([torch.randn(5, 2)], [torch.randn(6, 2)])
    with pytest.raises(DataError, match="expected 1"):
        acc.update([torch.randn(5, 2)] * 2, [torch.randn(5, 2)])
    with pytest.raises(DataError, match="NaN"):
        acc.update([torch.full((5, 2), float("nan"))], [torch.randn(5, 2)])
    with pytest.raises(ConfigError):
        CKAAccumulator(0, 1)
    with pytest.raises(ConfigError):
        CKAAccumulator(2.5, 1)
    assert CKAAccumulator(np.int64(2), 1).m == 2
    with pytest.raises(DataError, match="at least 4"):
        linear_cka(np.ones((2, 2)), np.ones((2, 2)))


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------


@st.composite
def cka_matrices(draw, integers: bool):
    m = draw(st.integers(1, 8))
    n = draw(st.integers(1, m))
    if integers:
        vals = st.integers(0, 2)
    else:
        vals = st.floats(-1, 1, allow_nan=False, allow_infinity=False)
    data = draw(st.lists(vals, min_size=m * n, max_size=m * n))
    return np.array(data, dtype=np.float64).reshape(m, n)


def _check_valid(pos: list[int], m: int, n: int, method: str) -> None:
    assert len(pos) == n and pos[0] == 0
    assert all(b > a for a, b in zip(pos, pos[1:])) and pos[-1] < m
    if method == "lma" and n > 1:
        assert pos[-1] == m - 1


@settings(max_examples=300, deadline=None)
@given(c=cka_matrices(integers=True), method=st.sampled_from(["sma", "lma"]))
def test_dp_matches_brute_force_with_ties(c, method):
    m, n = c.shape
    pos = align(c, method)
    _check_valid(pos, m, n, method)
    best, best_pos = brute_force(c, method)
    if n < m:  # n == m is the identity by definition
        assert alignment_score(c, pos, method) == best
        assert pos == best_pos  # lexicographically smallest optimum


@settings(max_examples=300, deadline=None)
@given(c=cka_matrices(integers=False), method=st.sampled_from(["sma", "lma"]))
def test_dp_matches_brute_force_floats(c, method):
    m, n = c.shape
    pos = align(c, method)
    _check_valid(pos, m, n, method)
    best, _ = brute_force(c, method)
    assert alignment_score(c, pos, method) == pytest.approx(best, abs=1e-9)


def test_ties_pick_earliest_positions():
    c = np.zeros((6, 3))
    assert align(c, "sma") == [0, 1, 2]
    assert align(c, "lma") == [0, 1, 5]


def test_known_alignments():
    c = np.zeros((5, 3))
    c[0, 0] = c[3, 1] = c[4, 2] = 1.0
    assert align(c, "sma") == [0, 3, 4]
    c = np.zeros((6, 3))
    c[1:4, 1] = 1.0
    c[4:, 2] = 1.0
    assert align(c, "lma") == [0, 3, 5]
    assert segments([0, 3, 5], 6) == [[0], [1, 2, 3], [4, 5]]


def test_equal_depth_is_identity():
    c = np.random.default_rng(0).random((5, 5))
    for method in ALIGN_METHODS:
        assert align(c, method) == [0, 1, 2, 3, 4]


def test_single_shallow_unit():
    c = np.random.default_rng(1).random((4, 1))
    for method in ALIGN_METHODS:
        assert align(c, method) == [0]


def test_uniform_spacing():
    assert align(np.zeros((7, 4)), "uniform") == [0, 2, 4, 6]
    assert align(np.zeros((6, 3)), "uniform") == [0, 3, 5]  # 2.5 rounds up
    assert align(np.zeros((9, 2)), "uniform") == [0, 8]
    for m in range(1, 12):
        for n in range(1, m + 1):
            pos = align(np.zeros((m, n)), "uniform")
            _check_valid(pos, m, n, "lma")
            if n > 1:
                steps = np.diff(pos)
                assert steps.max() - steps.min() <= 1


def test_segments():
    assert segments([0, 2, 3], 6) == [[0], [1, 2], [3]]  # SMA-style: rows 4, 5 uncovered
    assert segments([0], 1) == [[0]]
    with pytest.raises(ConfigError):
        segments([0, 0], 3)
    with pytest.raises(ConfigError):
        segments([0, 3], 3)
    with pytest.raises(ConfigError):
        segments([], 3)


def test_align_errors():
    with pytest.raises(ConfigError, match="lma, sma, uniform"):
        align(np.zeros((3, 2)), "greedy")
    with pytest.raises(ConfigError, match="transpose"):
        align(np.zeros((2, 3)), "lma")
    with pytest.raises(ConfigError):
        align(np.zeros((3, 0)), "sma")
    with pytest.raises(DataError):
        align(np.zeros(3), "sma")
    with pytest.raises(DataError):
        align(np.array([[np.nan], [0.0]]), "sma")


def test_dp_scales_linearly():
    """Doubling both the deep and the shallow depth multiplies the DP's time by about 4
    (O(n·m)); an algorithm with an extra factor of m would take 8× or more."""
    import time

    def seconds(m: int, n: int, method: str) -> float:
        c = np.random.default_rng(2).random((m, n))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            pos = align(c, method)
            best = min(best, time.perf_counter() - t0)
        _check_valid(pos, m, n, method)
        return best

    for method in ("sma", "lma"):
        ratio = seconds(1600, 600, method) / seconds(800, 300, method)
        assert ratio < 6.5, f"{method}: doubling m and n took {ratio:.1f}x as long"


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def test_plot_alignment_writes_png(tmp_path):
    rng = np.random.default_rng(3)
    c1, c2 = rng.random((5, 3)), rng.random((4, 4))
    path = tmp_path / "sub" / "align.png"
    out = plot_alignment([(c1, align(c1, "lma")), (c2, align(c2, "sma"))], path,
                         titles=["stage 1", "stage 2"])
    assert out == path
    data = path.read_bytes()
    assert len(data) > 0 and data.startswith(b"\x89PNG\r\n\x1a\n")
    assert [p.name for p in path.parent.iterdir()] == ["align.png"]  # no temp file left
    with pytest.raises(ConfigError):
        plot_alignment([(c1, [0, 1, 4])], tmp_path / "x.png", titles=["a", "b"])

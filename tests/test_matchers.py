"""Tests of graphmerge.match.matchers: average, permute, elastic ZipIt (fast == naive) and moments."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphmerge.errors import ConfigError, DataError, MismatchError
from graphmerge.match.matchers import (
    MATCHERS,
    Match,
    average_match,
    correlation_from_moments,
    get_matcher,
    hungarian_match,
    zip_budgets,
    group_correlations,
    zip_groups,
    zip_groups_candidates,
    zip_groups_naive,
    zip_match,
)
from graphmerge.match.statistics import TIE_BREAK, SpaceStats

log = logging.getLogger(__name__)


def _random_scores(rng: np.random.Generator, d: int, kind: str, nan_frac: float) -> np.ndarray:
    """Symmetric [d, d] scores with a unit diagonal.

    'ties': values in {-1, -3/4, ..., 1}; 'negative': in {-1, ..., 1/4}, mostly negative, where
    alpha * min(...) *raises* folded scores and creates fresh ties; 'coarse': in {0, 1};
    'normal': N(0, 1).
    """
    if kind == "ties":
        a = rng.integers(-4, 5, size=(d, d)) / 4.0
    elif kind == "negative":
        a = rng.integers(-4, 2, size=(d, d)) / 4.0
    elif kind == "coarse":
        a = rng.integers(0, 2, size=(d, d)).astype(float)
    else:
        a = rng.normal(size=(d, d))
    a = np.triu(a, 1)
    a = a + a.T
    if nan_frac > 0:
        mask = np.triu(rng.random((d, d)) < nan_frac, 1)
        a[mask | mask.T] = np.nan
    np.fill_diagonal(a, 1.0)
    return a


def _dup_corr(rng: np.random.Generator, d0: int, n: int = 400):
    """Correlation of model 0 (features X) and model 1 (features X[:, perm]) and perm."""
    x = rng.normal(size=(n, d0))
    perm = rng.permutation(d0)
    feats = np.concatenate([x, x[:, perm]], axis=1)
    return np.corrcoef(feats, rowvar=False), perm


def _check_structure(m: Match, widths: list[int]) -> None:
    r = m.width
    assert len(m.merge) == len(m.unmerge) == len(widths)
    for mi, ui, w in zip(m.merge, m.unmerge, widths):
        assert mi.shape == (r, w) and ui.shape == (w, r)
        assert mi.dtype == np.float64 and ui.dtype == np.float64
    u = np.concatenate(m.unmerge, axis=0)
    mm = np.concatenate(m.merge, axis=1)
    assert set(np.unique(u)) <= {0.0, 1.0}
    np.testing.assert_array_equal(u.sum(axis=1), 1.0)  # each unit in exactly one merged unit
    np.testing.assert_allclose(mm.sum(axis=1), 1.0)  # merged unit = mean of its members
    total = sum(mi @ ui for mi, ui in zip(m.merge, m.unmerge))
    np.testing.assert_allclose(total, np.eye(r), atol=1e-12)
    # groups agree with U and partition all units
    flat = sorted(i for g in m.groups for i in g)
    assert flat == list(range(sum(widths)))
    for k, g in enumerate(m.groups):
        np.testing.assert_array_equal(np.flatnonzero(u[:, k]), g)


# ---------------------------------------------------------------------------- fast == naive


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["ties", "negative", "negative", "coarse", "normal"]),
    nan_frac=st.sampled_from([0.0, 0.0, 0.1, 0.4]),
    r_frac=st.floats(0.0, 1.0),
    alpha=st.sampled_from([0.5, 1.0, 0.3]),
    beta=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_fast_equals_naive_property(widths, seed, kind, nan_frac, r_frac, alpha, beta):
    rng = np.random.default_rng(seed)
    d = sum(widths)
    c = _random_scores(rng, d, kind, nan_frac)
    r = 1 + min(d - 1, int(r_frac * d))
    fast = zip_groups(c, widths, r, alpha, beta)
    naive = zip_groups_naive(c, widths, r, alpha, beta)
    assert fast == naive
    assert len(fast) == r
    assert sorted(i for g in fast for i in g) == list(range(d))


@pytest.mark.parametrize("kind", ["normal", "ties", "negative"])
def test_fast_equals_naive_large(kind):
    rng = np.random.default_rng(1)
    widths = [300, 200]
    c = _random_scores(rng, 500, kind, 0.01)
    t0 = time.perf_counter()
    fast = zip_groups(c, widths, 300)
    t1 = time.perf_counter()
    naive = zip_groups_naive(c, widths, 300)
    t2 = time.perf_counter()
    log.info("d=300+200 r=300 %s: fast %.3fs, naive %.3fs", kind, t1 - t0, t2 - t1)
    assert fast == naive


def test_fast_equals_naive_three_models_compression():
    rng = np.random.default_rng(2)
    widths = [64, 40, 90]
    c = _random_scores(rng, sum(widths), "ties", 0.0)
    for r, beta in [(30, 1.0), (90, 0.0), (150, 2.0)]:
        assert zip_groups(c, widths, r, 0.5, beta) == zip_groups_naive(c, widths, r, 0.5, beta)


def test_fast_equals_naive_on_real_correlation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 20))
    feats = np.concatenate([x @ rng.normal(size=(20, 48)), x @ rng.normal(size=(20, 64))], axis=1)
    c = np.corrcoef(feats, rowvar=False)
    for r in (1, 20, 64, 100, 112):
        assert zip_groups(c, [48, 64], r) == zip_groups_naive(c, [48, 64], r)


def _low_rank_stats(rng: np.random.Generator, widths: list[int], samples: int,
                    decimals: int | None) -> SpaceStats:
    """Statistics of features from fewer samples than units (a rank-deficient correlation, as
    calibration of wide layers gives); rounded features make exact ties."""
    x = rng.normal(size=(samples, sum(widths)))
    if decimals is not None:
        x = np.round(x, decimals)
    stats = SpaceStats(list(widths))
    cut = np.cumsum([0, *widths])
    stats.add([torch.from_numpy(x[:, a:b]) for a, b in itertools.pairwise(cut)])
    return stats


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 16), min_size=1, max_size=3),
    samples=st.integers(2, 12),
    decimals=st.sampled_from([None, 0, 1]),
    seed=st.integers(0, 2**32 - 1),
    r_frac=st.floats(0.0, 1.0),
    beta=st.sampled_from([0.0, 1.0, 2.0]),
)
def test_fast_equals_naive_on_rank_deficient_statistics(widths, samples, decimals, seed,
                                                        r_frac, beta):
    # the correlation the merge uses (a torch tensor from the statistics), fewer samples than
    # units and ties: fast == naive, float32 input too; zip_match gives the same groups
    stats = _low_rank_stats(np.random.default_rng(seed), widths, samples, decimals)
    corr = stats.correlation()
    assert isinstance(corr, torch.Tensor) and torch.equal(corr, corr.T)
    d = sum(widths)
    r = 1 + min(d - 1, int(r_frac * d))
    naive = zip_groups_naive(corr.numpy(), widths, r, 0.5, beta)
    assert zip_groups(corr, widths, r, 0.5, beta) == naive
    assert zip_match(corr, widths, r, beta=beta).groups == naive
    c32 = corr.float()
    assert zip_groups(c32, widths, r, 0.5, beta) == zip_groups_naive(c32.numpy(), widths, r,
                                                                     0.5, beta)
    # the candidate variant with every pair a candidate is the exact rule
    assert zip_groups_candidates(corr, widths, r, 0.5, beta, k=d) == naive


def test_candidates_variant_is_close_and_exact_with_all_pairs():
    rng = np.random.default_rng(7)
    for t in range(40):
        widths = [int(w) for w in rng.integers(1, 10, size=rng.integers(1, 4))]
        c = _random_scores(rng, sum(widths), ["ties", "negative", "normal"][t % 3], 0.05)
        r = int(rng.integers(1, sum(widths) + 1))
        alpha, beta = [0.5, 1.0, 0.3][t % 3], [0.0, 0.5, 1.0, 2.0][t % 4]
        exact = zip_groups_naive(c, widths, r, alpha, beta)
        assert zip_groups_candidates(c, widths, r, alpha, beta, k=sum(widths)) == exact
    # few candidates: a partition into r groups, most groups as the exact rule's
    stats = _low_rank_stats(rng, [200, 200], 40, None)
    corr = stats.correlation()
    exact = zip_match(corr, [200, 200])
    fast = zip_match(corr, [200, 200], candidates=8)
    _check_structure(fast, [200, 200])
    same = len({tuple(g) for g in fast.groups} & {tuple(g) for g in exact.groups})
    assert same >= 0.7 * 200
    assert fast.mean_correlation > 0.9 * exact.mean_correlation
    with pytest.raises(ConfigError, match="candidates"):
        zip_groups_candidates(corr, [200, 200], 200, k=0)


def test_statistics_correlation_is_the_numpy_formula():
    # the torch correlation (by blocks of rows, on the sums' device) against the float64
    # numpy formula it replaced, with constant units and the tie-break
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 12)) * rng.uniform(0.5, 3, size=12) + rng.normal(size=12)
    x[:, 3] = 2.0  # constant
    x[:, 10] = 2.0  # the same constant, in model 1
    x[:, 7] = 0.0
    stats = SpaceStats([6, 6])
    stats.add([torch.from_numpy(x[:, :6]), torch.from_numpy(x[:, 6:])])
    corr = stats.correlation().numpy()
    sx, sxx, n = x.sum(0), x.T @ x, len(x)
    ref = np.asarray(correlation_from_moments(sx, sxx, n, widths=[6, 6]))
    mean = sx / n
    std = np.sqrt(np.clip(np.diag(sxx) / n - mean ** 2, 0.0, None))
    gap = np.abs(mean[:, None] - mean[None, :]) + np.abs(std[:, None] - std[None, :])
    size = np.abs(mean) + std
    scale = size[:, None] + size[None, :]
    ref = ref - TIE_BREAK * gap / np.maximum(scale, 1e-12)
    np.testing.assert_allclose(corr, ref, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(corr, corr.T)
    assert corr[3, 10] > 1 - 2 * TIE_BREAK and abs(corr[3, 4]) < 2 * TIE_BREAK
    out = correlation_from_moments(torch.from_numpy(sx), torch.from_numpy(sxx), n)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64


def test_group_correlations_reads_the_pairs():
    rng = np.random.default_rng(6)
    c = _random_scores(rng, 9, "normal", 0.0)
    groups = [[0, 4, 7], [1], [2, 8], [3, 5, 6]]
    expected = [float(np.mean([c[i, j] for i, j in itertools.combinations(g, 2)]))
                for g in groups if len(g) > 1]
    np.testing.assert_allclose(group_correlations(c, groups), expected, rtol=1e-12)
    np.testing.assert_allclose(group_correlations(torch.from_numpy(c), groups), expected,
                               rtol=1e-12)
    assert group_correlations(c, [[0], [1]]) == []


# ---------------------------------------------------------------------------- the rule itself


def _reference_zip(c: np.ndarray, widths: list[int], r: int, alpha: float,
                   beta: float) -> tuple[list[list[int]], bool]:
    """zip_match's rule as plainly as it can be written: scores of pairs (p < q) in a dict,
    the forbidden pairs K as a set; a group is named by its lowest unit.  Returns the groups
    and whether the flags were lifted."""
    d = sum(widths)
    model = [i for i, w in enumerate(widths) for _ in range(w)]
    score = {(i, j): 0.0 if np.isnan(c[i, j]) else float(c[i, j])
             for i, j in itertools.combinations(range(d), 2)}
    groups = {i: [i] for i in range(d)}
    budget = [int(b) for b in zip_budgets(widths, r, beta)]
    forbidden: set[tuple[int, int]] = set()

    def spent(m: int) -> None:  # K for every pair of live groups headed by model m
        forbidden.update(itertools.combinations(sorted(g for g in groups if model[g] == m), 2))

    def key(a: int, b: int) -> tuple[int, int]:
        return min(a, b), max(a, b)

    for m, b in enumerate(budget):
        if b == 0:
            spent(m)
    lifted = False
    while len(groups) > r:
        pairs = [pq for pq in itertools.combinations(sorted(groups), 2)
                 if lifted or pq not in forbidden]
        if not pairs:
            lifted = True
            continue
        p, q = max(pairs, key=lambda pq: (score[pq], -pq[0], -pq[1]))
        joined = [model[u] for u in groups[p] + groups[q]]
        for k in groups:
            if k not in (p, q):
                theirs = [model[u] for u in groups[k]]
                apart = (len(set(joined)) == len(joined) and len(set(theirs)) == len(theirs)
                         and not set(joined) & set(theirs))  # one unit per model, no model shared
                score[key(p, k)] = (1.0 if apart else alpha) * min(score[key(p, k)],
                                                                    score[key(q, k)])
                if key(q, k) in forbidden:
                    forbidden.add(key(p, k))
        groups[p] += groups.pop(q)
        if model[p] == model[q] and not lifted:
            budget[model[p]] -= 1
            if budget[model[p]] == 0:
                spent(model[p])
    return [sorted(groups[g]) for g in sorted(groups)], lifted


def test_budget_rule_against_the_reference_loop():
    # N = 1..3 models of unequal widths, budgets from 0 (beta=0) up, and r down to 1, where
    # the flags must be lifted
    rng = np.random.default_rng(12)
    lifts = 0
    for t in range(600):
        widths = [int(w) for w in rng.integers(1, 9, size=1 + t % 3)]
        d = sum(widths)
        c = _random_scores(rng, d, ["ties", "negative", "normal", "coarse"][t % 4],
                           0.1 * (t % 5 == 0))
        r = int(rng.integers(1, d + 1))
        alpha = [0.5, 1.0, 0.3][t % 3]
        beta = [0.0, 0.5, 1.0, 2.0][(t // 3) % 4]
        expected, lifted = _reference_zip(c, widths, r, alpha, beta)
        assert zip_groups_naive(c, widths, r, alpha, beta) == expected, (t, widths, r)
        assert zip_groups(c, widths, r, alpha, beta) == expected, (t, widths, r)
        lifts += lifted
    assert lifts >= 50  # the sweep does reach the lifting


def test_three_permuted_copies_of_correlated_units_zip_into_triples():
    # units of one model correlate up to 0.9 with each other, each with its copies 1: the
    # damped score of a pair against its third copy (alpha * 1) would lose to those 0.9
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 4)) @ rng.standard_normal((4, 12))
    x += 0.2 * rng.standard_normal(x.shape)
    perms = [np.arange(12), rng.permutation(12), rng.permutation(12)]
    c = np.corrcoef(np.concatenate([x[:, p] for p in perms], axis=1).T)
    assert np.sort(np.abs(c[:12, :12] - np.eye(12)).ravel())[-1] > 0.5
    expected = sorted(sorted(k * 12 + int(np.flatnonzero(p == u)[0]) for k, p in enumerate(perms))
                      for u in range(12))
    for groups in (zip_groups_naive(c, [12] * 3, 12), zip_groups(c, [12] * 3, 12),
                   zip_groups_candidates(c, [12] * 3, 12, k=36),
                   _reference_zip(c, [12] * 3, 12, 0.5, 1.0)[0]):
        assert groups == expected


def test_budget_rule_with_many_models():
    # many models: the fast matcher keeps one flag row per model
    rng = np.random.default_rng(13)
    widths = [1 + i % 2 for i in range(66)]
    c = _random_scores(rng, sum(widths), "ties", 0.0)
    for r, beta in [(70, 0.0), (66, 1.0), (20, 0.5)]:
        expected, _ = _reference_zip(c, widths, r, 0.5, beta)
        assert zip_groups(c, widths, r, 0.5, beta) == expected
        assert zip_groups_naive(c, widths, r, 0.5, beta) == expected


def test_zip_rule_hand_example_ties_and_fold():
    # units 0,1 (model 0), 2,3 (model 1); alpha=1 so folded scores are plain minima
    c = np.array([
        [1.0, 0.0, 0.5, 0.5],
        [0.0, 1.0, 0.5, 0.2],
        [0.5, 0.5, 1.0, 0.0],
        [0.5, 0.2, 0.0, 1.0],
    ])
    # tie at 0.5 between (0,2), (0,3), (1,2): row-major first is (0,2)
    assert zip_groups_naive(c, [2, 2], 3, 1.0, 0.0) == [[0, 2], [1], [3]]
    # then C[0,1] = min(0, .5) = 0, C[0,3] = min(.5, 0) = 0, C[1,3] = .2 -> (1,3)
    assert zip_groups(c, [2, 2], 2, 1.0, 0.0) == [[0, 2], [1, 3]]


def test_negative_correlations_can_rise_after_fold():
    # alpha*min of negatives is larger than both: the merged row must be re-read upward
    c = np.array([
        [1.0, -0.9, -0.8, -0.6],
        [-0.9, 1.0, -0.1, -1.0],
        [-0.8, -0.1, 1.0, -0.7],
        [-0.6, -1.0, -0.7, 1.0],
    ])
    widths = [2, 2]  # two models: every fold is damped
    for r in (1, 2, 3):
        assert zip_groups(c, widths, r, 0.5, 1.0) == zip_groups_naive(c, widths, r, 0.5, 1.0)
    # step 1 merges (1,2) at -0.1; then C[0,1] = .5*min(-.9,-.8) = -.45 beats C[0,3] = -.6
    assert zip_groups(c, widths, 2, 0.5, 1.0) == [[0, 1, 2], [3]]


def test_raised_score_ties_existing_row_max():
    # one model of 6 units, r=3, alpha=.5, beta=1 (budget 3: every pair allowed)
    c = np.array([
        [1.0, -1.0, 0.25, -0.5, -1.0, -1.0],
        [-1.0, 1.0, -0.5, -0.75, -1.0, 0.25],
        [0.25, -0.5, 1.0, 0.0, 0.0, -0.75],
        [-0.5, -0.75, 0.0, 1.0, -1.0, 0.0],
        [-1.0, -1.0, 0.0, -1.0, 1.0, -0.25],
        [-1.0, 0.25, -0.75, 0.0, -0.25, 1.0],
    ])
    # (0,2) then (1,5) at 0.25; folding 5 into 1 raises C[0,1] from -.5 to .5*min(-.5,-.5) =
    # -.25, tying row 0's max C[0,3] = -.25: the row-major rule takes (0,1), not (0,3)
    expected = [[0, 1, 2, 5], [3], [4]]
    assert zip_groups_naive(c, [6], 3, 0.5, 1.0) == expected
    assert zip_groups(c, [6], 3, 0.5, 1.0) == expected


def test_budgets_formula():
    np.testing.assert_array_equal(zip_budgets([10, 10], 10, 1.0), [5, 5])
    np.testing.assert_array_equal(zip_budgets([30, 10], 30, 0.5), [3, 1])
    np.testing.assert_array_equal(zip_budgets([7, 3], 5, 0.0), [0, 0])
    # beta read as the decimal 0.3: 0.3 * 10 * 20/20 = 3 (the binary 0.3 would floor to 2)
    np.testing.assert_array_equal(zip_budgets([20], 10, 0.3), [3])


def test_beta_zero_keeps_models_apart_when_possible(caplog):
    rng = np.random.default_rng(4)
    c, _ = _dup_corr(rng, 24)
    with caplog.at_level(logging.DEBUG, logger="graphmerge.match.matchers"):
        groups = zip_groups(c, [24, 24], 24, 0.5, 0.0)
    assert "lifting" not in caplog.text
    for g in groups:
        models = [i // 24 for i in g]
        assert len(models) == len(set(models)), g


def test_beta_zero_a_group_inherits_the_flags_of_what_it_absorbs(caplog):
    # beta=0: K(0,1) and K(2,3) from the start.  (0,2) at 0.9 passes K(2,3) on to group 0, so
    # it may not take unit 3 next (0.8); (0,1) is flagged too, leaving (1,3)
    c = np.array([
        [1.0, 0.0, 0.9, 0.8],
        [0.0, 1.0, -0.5, -0.5],
        [0.9, -0.5, 1.0, 0.0],
        [0.8, -0.5, 0.0, 1.0],
    ])
    with caplog.at_level(logging.DEBUG, logger="graphmerge.match.matchers"):
        fast = zip_groups(c, [2, 2], 2, 1.0, 0.0)
    assert "lifting" not in caplog.text
    assert fast == zip_groups_naive(c, [2, 2], 2, 1.0, 0.0) == [[0, 2], [1, 3]]


def test_budget_running_out_flags_the_live_groups_of_that_model():
    # widths [2, 3], r=2: budgets [1, 1] (alpha=1: folded scores are plain minima)
    c = np.eye(5)
    for (i, j), v in {(0, 1): .2, (0, 2): .8, (0, 3): .8, (0, 4): .7, (1, 2): .2, (1, 3): .2,
                      (1, 4): .1, (2, 3): .9, (2, 4): .7, (3, 4): .7}.items():
        c[i, j] = c[j, i] = v
    # (2,3) spends model 1's budget: K(2,4).  (0,2) passes it on: K(0,4), so group 0 may not
    # absorb unit 4 at 0.7 (a budget counted by group heads only would allow it) and takes
    # its own unit 1 at 0.2 instead
    expected = [[0, 1, 2, 3], [4]]
    assert _reference_zip(c, [2, 3], 2, 1.0, 1.0) == (expected, False)
    assert zip_groups_naive(c, [2, 3], 2, 1.0, 1.0) == expected
    assert zip_groups(c, [2, 3], 2, 1.0, 1.0) == expected


def test_budgets_lifted_when_needed(caplog):
    rng = np.random.default_rng(5)
    c = _random_scores(rng, 10, "normal", 0.0)
    with caplog.at_level(logging.DEBUG, logger="graphmerge.match.matchers"):
        groups = zip_groups(c, [10], 4, 0.5, 0.0)  # one model, no budget: must lift
    assert "lifting" in caplog.text
    assert len(groups) == 4
    assert groups == zip_groups_naive(c, [10], 4, 0.5, 0.0)


def test_budget_exhaustion_forbids_same_model_pairs():
    # model 0's units are all alike (0.9); cross pairs 0.1; model 1's pairs 0
    c = np.full((12, 12), 0.1)
    c[:8, :8] = 0.9  # model 0 units all alike
    c[8:, 8:] = 0.0
    np.fill_diagonal(c, 1.0)
    groups = zip_groups(c, [8, 4], 8, 1.0, 0.5)
    assert groups == zip_groups_naive(c, [8, 4], 8, 1.0, 0.5)
    # budgets: model 0 floor(0.5*4*8/12) = 1, model 1 floor(0.5*4*4/12) = 0.  (0,1) at 0.9 is
    # the one within-model fold; the other model-0 pairs (still 0.9) are then forbidden.
    assert groups == [[0, 1, 8], [2, 9], [3, 10], [4], [5], [6], [7], [11]]


# ---------------------------------------------------------------------------- Match objects


def test_duplicated_units_zip_permute_average():
    rng = np.random.default_rng(6)
    d0 = 32
    c, perm = _dup_corr(rng, d0)
    inv = np.argsort(perm)
    expected = [[k, d0 + int(inv[k])] for k in range(d0)]

    mz = zip_match(c, [d0, d0], r=d0)
    assert mz.width == d0
    assert mz.groups == expected
    assert mz.mean_correlation == pytest.approx(1.0)
    _check_structure(mz, [d0, d0])

    mp = hungarian_match(c, [d0, d0])
    assert mp.groups == expected
    np.testing.assert_array_equal(mp.unmerge[0], np.eye(d0))
    _check_structure(mp, [d0, d0])

    ma = average_match(c, [d0, d0])
    for mi, ui in zip(ma.merge, ma.unmerge):
        np.testing.assert_array_equal(mi, np.eye(d0) / 2)
        np.testing.assert_array_equal(ui, np.eye(d0))
    _check_structure(ma, [d0, d0])


def test_permute_three_models():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 10))
    p1, p2 = rng.permutation(10), rng.permutation(10)
    c = np.corrcoef(np.concatenate([x, x[:, p1], x[:, p2]], axis=1), rowvar=False)
    m = hungarian_match(c, [10, 10, 10])
    _check_structure(m, [10, 10, 10])
    for k, g in enumerate(m.groups):
        assert g == [k, 10 + int(np.argsort(p1)[k]), 20 + int(np.argsort(p2)[k])]
        np.testing.assert_allclose(m.merge[2][k].sum(), 1 / 3)


@pytest.mark.parametrize("widths,r", [([16, 24], 8), ([16, 24], None), ([16, 24], 40),
                                      ([5, 7, 9], 3), ([12], 6), ([12], 12)])
def test_zip_widths_compression_and_no_merge(widths, r):
    rng = np.random.default_rng(8)
    d = sum(widths)
    c = np.corrcoef(rng.normal(size=(200, d)), rowvar=False)
    m = get_matcher("zip")(c, widths, r=r)
    assert m.width == (max(widths) if r is None else r)
    _check_structure(m, widths)
    if r == d:
        assert m.groups == [[i] for i in range(d)]
        assert np.isnan(m.mean_correlation)
        np.testing.assert_array_equal(np.concatenate(m.unmerge), np.eye(d))


def test_zip_handles_nan_dead_units():
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(100, 12))
    feats[:, 3] = 0.0  # dead unit -> NaN row in np.corrcoef
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(feats, rowvar=False)
    assert np.isnan(c).any()
    m = zip_match(c, [6, 6])
    _check_structure(m, [6, 6])
    assert np.isfinite(m.mean_correlation)


# ---------------------------------------------------------------------------- errors


def test_invalid_arguments():
    c = np.eye(6)
    for r in (0, 7, -1):
        with pytest.raises(ConfigError, match=r"1 <= r <= d = 6"):
            zip_match(c, [3, 3], r=r)
    with pytest.raises(ConfigError, match="average, permute, zip"):
        get_matcher("zipit")
    assert set(MATCHERS) == {"average", "permute", "zip"}
    assert get_matcher("permute").fn is hungarian_match
    with pytest.raises(MismatchError, match='method="zip"'):
        average_match(np.eye(5), [2, 3])
    with pytest.raises(MismatchError, match="equal widths"):
        hungarian_match(np.eye(5), [2, 3])
    with pytest.raises(ConfigError, match="r=None"):
        average_match(c, [3, 3], r=2)
    with pytest.raises(ConfigError, match="r=None"):
        hungarian_match(c, [3, 3], r=4)
    assert average_match(c, [3, 3], r=3).width == 3
    with pytest.raises(ConfigError, match="does not take alpha"):  # options are declared
        get_matcher("average")(c, [3, 3], alpha=0.5)
    assert get_matcher("zip")(c, [3, 3], alpha=0.3).width == 3
    with pytest.raises(ConfigError, match="alpha"):
        zip_match(c, [3, 3], alpha=1.5)
    with pytest.raises(ConfigError, match="beta"):
        zip_match(c, [3, 3], beta=-1)
    with pytest.raises(ConfigError, match="widths"):
        zip_match(c, [3, 0, 3])
    with pytest.raises(ConfigError, match="widths"):
        zip_match(c, [])
    with pytest.raises(DataError, match="shape"):
        zip_match(np.eye(5), [3, 3])
    bad = np.eye(6)
    bad[0, 1] = np.inf
    bad[1, 0] = np.inf
    with pytest.raises(DataError, match="inf"):
        zip_match(bad, [3, 3])
    asym = np.eye(6)
    asym[0, 1] = 0.5
    with pytest.raises(DataError, match="symmetric"):
        zip_match(asym, [3, 3])
    with pytest.raises(ConfigError):
        zip_groups(c, [3, 3], 0)


# ---------------------------------------------------------------------------- moments


def test_correlation_from_moments_matches_corrcoef():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(500, 15)) @ rng.normal(size=(15, 15)) + rng.normal(size=15) * 5
    x[:, 4] = 3.0  # zero variance
    x[:, 9] = 0.0  # zero variance, zero mean
    x[:, 12] = 3.0  # the same constant as unit 4
    sum_x = np.zeros(15)
    sum_xx = np.zeros((15, 15))
    for chunk in np.array_split(x, 7):  # streamed
        sum_x += chunk.sum(axis=0)
        sum_xx += chunk.T @ chunk
    corr = correlation_from_moments(sum_x, sum_xx, len(x))
    assert corr.dtype == np.float64 and corr.shape == (15, 15)
    live = np.setdiff1d(np.arange(15), [4, 9, 12])
    ref = np.corrcoef(x[:, live], rowvar=False)
    np.testing.assert_allclose(corr[np.ix_(live, live)], ref, atol=1e-10)
    # constant units: 1 with constants of the same value (themselves included), else 0
    expected = {4: {4, 12}, 9: {9}, 12: {4, 12}}
    for dead, same in expected.items():
        np.testing.assert_array_equal(corr[dead], np.isin(np.arange(15), list(same)))
    np.testing.assert_array_equal(corr, corr.T)
    with pytest.raises(DataError):
        correlation_from_moments(sum_x, sum_xx, 0)
    with pytest.raises(DataError):
        correlation_from_moments(sum_x, sum_xx[:3], 10)


def test_fast_equals_naive_seeded_sweep():
    # deterministic companion of the property test, heavy on negative ties
    rng = np.random.default_rng(11)
    for t in range(300):
        widths = [int(w) for w in rng.integers(1, 13, size=rng.integers(1, 5))]
        d = sum(widths)
        c = _random_scores(rng, d, ["negative", "ties", "coarse"][t % 3], 0.05 * (t % 2))
        r = int(rng.integers(1, d + 1))
        alpha = [0.5, 1.0, 0.3][t % 3]
        beta = [0.0, 0.5, 1.0, 2.0][(t // 3) % 4]
        assert zip_groups(c, widths, r, alpha, beta) == zip_groups_naive(c, widths, r, alpha, beta)

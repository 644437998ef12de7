"""Units that are constant on the calibration data (dead ReLU units): paired by value, so a
self-merge with dead units is exact."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.match import matchers
from graphmerge.match.matchers import correlation_from_moments, zip_match


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    sum_x = np.zeros(x.shape[1])
    sum_xx = np.zeros((x.shape[1], x.shape[1]))
    for chunk in np.array_split(x, 5):  # streamed, as the statistics pass does
        sum_x += chunk.sum(axis=0)
        sum_xx += chunk.T @ chunk
    return sum_x, sum_xx, len(x)


def _twin_features(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Model 0 (8 units) and a permuted copy whose varying units are at 1e-6 of the scale
    (model 1, 8 units).

    Per model: 4 varying units, a dead unit (exactly 0), a unit that only carries rounding
    noise around 0 (what is left of a sum that cancels: 1e-9 of the varying units' scale), and
    two units constant at 0.5 up to rounding.  The copy has its own noise.  Returns the
    features [n, 16] and, per unit of model 0, its twin's global index.
    """
    live = rng.normal(size=(n, 3)) @ rng.normal(size=(3, 4)) + rng.normal(size=(n, 4))

    def model(scale: float) -> np.ndarray:
        noise = 1e-9 * scale * rng.normal(size=n)
        half = 0.5 + 1e-12 * rng.normal(size=(n, 2))
        return np.column_stack([scale * live, np.zeros(n), noise, half])

    perm = rng.permutation(8)
    x = np.concatenate([model(1.0), model(1e-6)[:, perm]], axis=1)
    return x, 8 + np.argsort(perm)


def test_constant_units_correlate_by_value_at_their_models_scale():
    rng = np.random.default_rng(0)
    x, twin = _twin_features(rng)
    corr = correlation_from_moments(*_moments(x), widths=[8, 8])
    np.testing.assert_array_equal(corr, corr.T)
    live = np.r_[0:4, twin[:4]]
    np.testing.assert_allclose(corr[np.ix_(live, live)], np.corrcoef(x[:, live], rowvar=False),
                               atol=1e-9)
    zeros = np.r_[4:6, twin[4:6]]  # dead and noise-only units, in both models
    halves = np.r_[6:8, twin[6:8]]
    for group in (zeros, halves):
        np.testing.assert_array_equal(corr[np.ix_(group, group)], 1.0)
    np.testing.assert_array_equal(corr[np.ix_(zeros, halves)], 0.0)
    np.testing.assert_array_equal(corr[np.ix_(np.r_[zeros, halves], live)], 0.0)
    # judged against the whole space, model 1's varying units (at 1e-6 of model 0's scale)
    # would count as constant; judged against its own units they are not
    assert (corr[np.ix_(twin[:4], twin[:4])] != 1.0).any()
    flat = correlation_from_moments(*_moments(x))
    np.testing.assert_array_equal(flat[np.ix_(twin[:4], twin[:4])], 1.0)
    # a unit's own scale still decides for a constant with a large mean
    big = np.column_stack([x[:, :4], 1e6 + 1e-4 * rng.normal(size=len(x))])
    assert correlation_from_moments(*_moments(big))[4, 4] == 1.0
    assert correlation_from_moments(*_moments(big))[4, 0] == 0.0


def test_zip_pairs_constant_units_with_their_twins():
    rng = np.random.default_rng(1)
    x, twin = _twin_features(rng)
    corr = correlation_from_moments(*_moments(x), widths=[8, 8])
    groups = zip_match(corr, [8, 8]).groups
    assert [g for g in groups if g[0] < 4] == [[k, int(twin[k])] for k in range(4)]
    for g in groups:
        if g[0] >= 4:  # constants merge only with constants of the same value
            assert set(g) <= set(np.r_[4:6, twin[4:6]]) or set(g) <= set(np.r_[6:8, twin[6:8]])


def _mlp_with_dead_units(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                      nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        m[1].bias[[1, 4, 5, 9, 10, 17]] = -100.0  # dead
        m[1].weight[[2, 20]] *= 1e-7  # all but dead: tiny values near 0
        m[3].bias[[0, 7]] = -100.0
        m[3].weight[[3, 11]] = 0.0  # constant at the bias, two units of one value
        m[3].bias[[3, 11]] = 0.25
        m[5].bias[2:15] = -100.0  # mostly dead
    return m.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_self_merge_with_dead_units_is_exact(seed):
    m = _mlp_with_dead_units(seed)
    x = torch.randn(96, 20)
    batches = [x[i:i + 32] for i in range(0, 96, 32)]
    twin = gm.permute(m, x[:32], seed=1)
    result = gm.merge([m, twin], batches, method="zip", progress=False)
    y = torch.randn(64, 20)
    with torch.no_grad():
        ref = m(y)
        assert float((result.module(y) - ref).norm() / ref.norm()) < 1e-4


def test_the_docstring_example_runs():
    result = doctest.testmod(matchers)
    assert result.attempted > 0 and result.failed == 0

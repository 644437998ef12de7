"""What makes large merges cheap (issue 21) must not change what they compute: the in-place
correlation, the zip on a lent correlation, the sparse parameter transforms and the oracle on a
few samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.match.matchers import zip_match
from graphmerge.match.statistics import SpaceStats
from graphmerge.passes.parameters import _apply


def _stats(widths: list[int], n: int = 40, seed: int = 0) -> SpaceStats:
    """Features with a shared latent, a constant unit, a dead unit and two tied units."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 6, generator=gen)
    rows = [torch.tanh(latent @ torch.randn(6, w, generator=gen)
                       + 0.3 * torch.randn(n, w, generator=gen)) for w in widths]
    rows[0][:, 1] = 2.0
    rows[-1][:, 0] = 0.0
    rows[-1][:, 2] = rows[-1][:, 3]
    st = SpaceStats(list(widths))
    st.add([r[: n // 2] for r in rows])
    st.add([r[n // 2:] for r in rows])
    return st


@pytest.mark.parametrize("widths", [[300, 290], [5, 3, 4]])
def test_the_correlation_written_over_the_sums_is_the_same_bit_for_bit(widths):
    st = _stats(widths)
    expected = st.correlation()
    got = st.correlation(consume=True)
    assert torch.equal(got, expected)
    assert st._sxx is None  # used up: no second d x d tensor


def test_the_zip_on_a_lent_correlation_gives_the_same_match_and_keeps_the_lower_triangle():
    widths = [150, 140]
    corr = _stats(widths, n=24).correlation()  # fewer samples than units: many near ties
    lent = corr.clone()
    for r in (150, 100):
        lent.copy_(corr)
        a = zip_match(corr, widths, r, alpha=0.5, beta=0.3)
        b = zip_match(lent, widths, r, alpha=0.5, beta=0.3, overwrite=True)
        assert a.groups == b.groups
        assert a.mean_correlation == b.mean_correlation
        assert torch.equal(lent.tril(-1), corr.tril(-1))
        assert not torch.equal(lent, corr)  # the scores were kept in it
    asym = corr.clone()
    asym[0, 1] += 1e-15
    with pytest.raises(gm.DataError, match="exactly symmetric"):
        zip_match(asym, widths, overwrite=True)


def test_a_sparse_transform_is_the_dense_product():
    rng = np.random.default_rng(0)
    t = torch.randn(6, 7, 5, dtype=torch.float64)
    sparse = np.zeros((4, 7))
    sparse[[0, 1, 1, 2, 3], [3, 0, 6, 2, 5]] = [1.0, 0.5, 0.5, 1 / 3, 1.0]
    dense = rng.standard_normal((4, 7))
    for a in (sparse, dense):
        expected = torch.tensordot(torch.from_numpy(a), t, dims=([1], [1])).movedim(0, 1)
        got = _apply(t, 1, a, torch.float64)
        assert got.shape == (6, 4, 5)
        torch.testing.assert_close(got, expected, rtol=1e-15, atol=1e-15)


class _Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_the_merge_check_on_a_few_samples_still_refuses_a_broken_rule(monkeypatch):
    from graphmerge.graph import rules

    monkeypatch.setitem(rules.RULES, torch.cumsum, rules.RULES[torch.relu])
    x = torch.randn(16, 3)
    with pytest.raises(gm.SpaceCheckError, match="cumsum"):
        gm.merge([_Cumulative(), _Cumulative()], [(x,)], progress=False)


class _FixedBatch(nn.Module):
    """Runs on batches of 8 only (the batch is written into its forward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).reshape(8, 2)


def test_a_model_that_runs_on_its_whole_batch_only_is_checked_on_it():
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    result = gm.merge([_FixedBatch(), _FixedBatch()], [(x,)], frontend="fx", progress=False)
    assert result.module(x).shape == (8, 2)


def test_the_zip_plans_nonzeros_give_the_merge_that_reading_the_matrices_gives(monkeypatch):
    from graphmerge.match.plans import SpaceTransforms

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(),
                            nn.Linear(12, 3)) for _ in range(2)]
    data = [(torch.randn(32, 5),)]
    result = gm.merge(models, data, progress=False)
    assert any(plan.groups for plan in result.plans.values())  # the nonzeros are known
    known = result.module.state_dict()
    monkeypatch.setattr(SpaceTransforms, "entries", lambda self, i, sid, average: None)
    read = gm.merge(models, data, progress=False).module.state_dict()
    assert known.keys() == read.keys()
    assert all(torch.equal(known[k], read[k]) for k in known)


def test_the_zip_plans_averages_are_the_dense_merge_products():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 3)) for _ in range(2)]
    result = gm.merge(models, [(torch.randn(32, 5),)], progress=False)
    rng = np.random.default_rng(0)
    for plan in result.plans.values():
        assert plan.groups is not None
        values = [rng.standard_normal(w) for w in plan.widths]
        dense = sum(np.asarray(m) @ v for m, v in zip(plan.merge, values))
        np.testing.assert_allclose(plan.averaged(values), dense, rtol=1e-12, atol=1e-12)


def test_wide_statistics_summed_in_float32_give_the_float64_correlation(monkeypatch):
    from graphmerge.match import statistics

    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(300, 8, generator=gen)
    # units with large means and small spreads: raw float32 sums would lose their variance
    rows = [50.0 + torch.tanh(latent @ torch.randn(8, w, generator=gen)) for w in (40, 30)]
    batches = [[r[k:k + 100] for r in rows] for k in range(0, 300, 100)]
    got = {}
    for units in (10, 10_000):  # float32 sums, then float64 ones
        monkeypatch.setattr(statistics, "FLOAT32_UNITS", units)
        st = SpaceStats([40, 30])
        for b in batches:
            st.add(b)
        assert st._sxx.dtype == (torch.float32 if units == 10 else torch.float64)
        got[units] = st.correlation()
    torch.testing.assert_close(got[10], got[10_000], rtol=0, atol=2e-5)
    x = torch.cat(rows, 1).double()
    torch.testing.assert_close(got[10_000], torch.corrcoef(x.T), rtol=0, atol=1e-6)


def test_the_oracle_screen_in_float32_falls_back_to_float64_before_refusing(monkeypatch):
    from graphmerge.graph import rules
    from graphmerge.passes import check

    calls = []
    oracle64 = check._oracle64
    monkeypatch.setattr(check, "_oracle64", lambda ctx, x: calls.append(1) or oracle64(ctx, x))
    x = torch.randn(16, 3)
    gm.merge([_Cumulative(), _Cumulative()], [(x,)], progress=False)
    assert not calls  # a correct table passes the screen: no float64 copy
    monkeypatch.setitem(rules.RULES, torch.cumsum, rules.RULES[torch.relu])
    with pytest.raises(gm.SpaceCheckError, match="cumsum"):
        gm.merge([_Cumulative(), _Cumulative()], [(x,)], progress=False)
    assert calls  # the verdict is the float64 oracle's


@pytest.mark.parametrize("widths", [[20, 15, 9], [23]])
def test_sums_written_by_chunks_above_the_diagonal_are_the_whole_sums(monkeypatch, widths):
    from graphmerge.match import statistics

    monkeypatch.setattr(statistics, "CHUNK", 7)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(50, w, generator=gen, dtype=torch.float64) + 3 for w in widths]
    st = SpaceStats(list(widths))
    st.add([r[:25] for r in rows])
    st.add([r[25:] for r in rows])
    assert len(st._cuts()) > len(widths) + 1  # the models' own blocks are chunked
    x = torch.cat(rows, 1)
    sx, sxx = st.sums()
    torch.testing.assert_close(sx, x.sum(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(sxx, x.T @ x, rtol=1e-12, atol=1e-9)

"""Elastic zip across widths: a narrow model merged with a widened copy of itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.lab import zoo
from graphmerge.passes import reset_batch_norms
from graphmerge.surgery.widen import widen

FAMILIES = {
    "mlp": lambda: zoo.mlp(hidden=(24, 16)),
    "resnet": lambda: zoo.resnet(depths=(1, 1, 1), width=1, stem_stride=2),
    "vgg": lambda: zoo.vgg(channels=(8, "M", 12), hidden=24),
    "vit": lambda: zoo.vit(dim=32, depth=1, heads=4, mlp_dim=40),
}


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of real inputs (as after training), so units are not constant."""
    reset_batch_norms(model, [(x,)], progress=False)
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_widen_keeps_the_function(family):
    x = torch.randn(16, 1, 28, 28)
    model = _trained_like(FAMILIES[family](), x)
    wide = widen(model, x, extra=0.5, seed=1)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y = torch.randn(8, 1, 28, 28)
        assert _rel(model(y), wide(y)) < 1e-5


@pytest.mark.parametrize("narrow_first", [True, False])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_narrow_merged_with_its_widened_copy_recovers_the_function(family, narrow_first):
    calib = [torch.randn(48, 1, 28, 28) for _ in range(2)]
    model = _trained_like(FAMILIES[family](), calib[0])
    wide = widen(model, calib[0], extra=0.5, seed=3)
    pair = [model, wide] if narrow_first else [wide, model]
    result = gm.merge(pair, calib, heads="average", norms="none", progress=False)
    merged_widths = [s["width"] for s in result.spaces]
    assert merged_widths == [max(s["widths"]) for s in result.spaces]
    assert any(len(set(s["widths"])) > 1 for s in result.spaces)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert _rel(model(x), result.module(x)) < 1e-4


def test_width_ratio_compresses_the_merged_model():
    calib = [torch.randn(64, 1, 28, 28)]
    a = _trained_like(FAMILIES["mlp"](), calib[0])
    b = _trained_like(FAMILIES["mlp"](), calib[0])
    full = gm.merge([a, b], calib, heads="average", progress=False)
    half = gm.merge([a, b], calib, heads="average", width=0.5, progress=False)
    assert [s["width"] for s in half.spaces] == [12, 8]
    assert half.module.get_submodule("layers.0").out_features == 12
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(half.module) < n(full.module)
    sid = half.spaces[0]["space"]
    exact = gm.merge([a, b], calib, heads="average", width={sid: 30}, progress=False)
    assert [s["width"] for s in exact.spaces] == [30, 16]
    with torch.no_grad():
        assert torch.isfinite(exact.module(calib[0])).all()


@pytest.mark.parametrize("width, match", [(2, "ratio"), ({99: 4}, "not merged"), (-0.5, "positive"),
                                          (100.0, "out of range")])
def test_bad_widths_are_refused(width, match):
    calib = [torch.randn(32, 1, 28, 28)]
    m = FAMILIES["mlp"]()
    with pytest.raises(gm.ConfigError, match=match):
        gm.merge([m, m], calib, heads="average", width=width, progress=False)


def test_average_refuses_unequal_widths():
    calib = [torch.randn(32, 1, 28, 28)]
    m = _trained_like(FAMILIES["mlp"](), calib[0])
    with pytest.raises(gm.MismatchError, match="zip"):
        gm.merge([m, widen(m, calib[0])], calib, method="average", heads="average",
                 progress=False)


def test_three_models_of_different_widths_merge_and_are_finite():
    calib = [torch.randn(48, 1, 28, 28) for _ in range(2)]
    models = [_trained_like(zoo.resnet(depths=(1, 1, 1), width=w, stem_stride=2), calib[0])
              for w in (1, 2, 1)]
    result = gm.merge(models, calib, heads="average", progress=False)
    assert all(len(s["widths"]) == 3 for s in result.spaces)
    assert [s["width"] for s in result.spaces][:2] == [32, 32]
    with torch.no_grad():
        out = result.module(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(torch.isfinite(p).all() for p in result.module.state_dict().values()
               if p.is_floating_point())


def test_widen_keeps_the_width_of_spaces_an_op_reduces_over():
    """A hand-written RMS norm (pow, mean, rsqrt): its axis is normalised over, found from the
    graph, not from a module class."""

    class RMSNormNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            h = self.a(x)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
            return self.b(h)

    model, x = RMSNormNet(), torch.randn(8, 4)
    table = gm.trace(model, x).space_table
    hidden = next(s for s in table if any(a.param == "a.weight" and a.dim == 0
                                          for a in s.params))
    assert hidden.reduced and not hidden.frozen
    wide = widen(model, x, extra=0.5)
    assert wide.a.weight.shape == model.a.weight.shape
    with torch.no_grad():
        assert torch.allclose(wide(x), model(x), atol=1e-6)


def test_widen_refuses_a_width_held_outside_the_graph():
    class ReadsAttribute(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
            self.hidden = 6

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).view(-1, self.hidden))

    with pytest.raises(gm.GraphmergeError, match="outside the graph"):
        widen(ReadsAttribute(), torch.randn(8, 4), extra=0.5)

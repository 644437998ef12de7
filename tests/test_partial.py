"""Partial merges: the graph up to a cut is merged, each model keeps its own layers after it.
A self-merge stays exact at any cut, a merge at full width (nothing zipped) is the ensemble,
the cut is validated, and the partial module exports to ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error
from graphmerge.lab.zoo.registry import builtin


def _pair(name: str, **kwargs) -> tuple[nn.Module, nn.Module, torch.Tensor, list]:
    torch.manual_seed(0)
    a, x = builtin(name, **kwargs)
    torch.manual_seed(1)
    b, _ = builtin(name, **kwargs)
    calibration = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(k))
                   for k in range(2)]
    return a.eval(), b.eval(), x, calibration


@pytest.mark.parametrize("name,kwargs", [("resnet", dict(depths=[1, 1, 1], width=1)),
                                         ("vit", dict(depth=2, dim=32, heads=4, mlp_dim=48))])
@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_a_partial_self_merge_is_exact(name, kwargs, cut):
    model, _, x, calibration = _pair(name, **kwargs)
    before = copy.deepcopy(model.state_dict())
    twin = gm.permute(model, x, seed=2)
    result = gm.merge([model, twin], calibration, x, partial=cut, progress=False)
    assert output_error(model, result.module, (calibration[0],)) < 1e-4
    full = sum(p.numel() for p in model.parameters())
    assert full < sum(p.numel() for p in result.module.parameters()) < 2 * full
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _one(out):
    """The output tensor (an exported graph returns a tuple of one)."""
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_at_full_width_the_partial_merge_is_the_ensemble(frontend):
    """Nothing zipped (merged width = the sum of the widths): each model's tail reads exactly
    its own features with its own weights (exported graphs read every weight at the top, before
    any cut), so the partial module averages the two models' outputs."""
    a, b, x, calibration = _pair("mlp")
    result = gm.merge([a, b], calibration, x, width=2.0, partial=0.5, norms="none",
                      frontend=frontend, progress=False)
    with torch.no_grad():
        ensemble = (a(calibration[0]) + b(calibration[0])) / 2
        torch.testing.assert_close(_one(result.module(calibration[0])), ensemble, rtol=1e-4,
                                   atol=1e-5)
    concat = gm.merge([a, b], calibration, x, width=2.0, partial=0.5, heads="concat",
                      norms="none", frontend=frontend, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(_one(concat.module(calibration[0])),
                                   torch.cat([a(calibration[0]), b(calibration[0])], -1),
                                   rtol=1e-4, atol=1e-5)


def test_cuts_by_node_and_space_and_bad_cuts(tmp_path):
    a, b, x, calibration = _pair("resnet", depths=[1, 1, 1], width=1)
    traced = gm.trace(a, x)
    node = next(n.name for n in traced.graph.nodes if n.op == "call_module"
                and isinstance(a.get_submodule(n.target), nn.Conv2d))
    space = traced.space_table.free[0].id
    for cut in (node, space):
        result = gm.merge([a, b], calibration, x, partial=cut, progress=False)
        out = result.module(calibration[0])
        assert out.shape == a(calibration[0]).shape and torch.isfinite(out).all()
    gm.export_onnx(result.module, x, tmp_path / "partial.onnx", atol=1e-4)
    with pytest.raises(gm.ConfigError, match="not a node of the graph"):
        gm.merge([a, b], calibration, x, partial="no_such_node", progress=False)
    with pytest.raises(gm.ConfigError, match="not a space id"):
        gm.merge([a, b], calibration, x, partial=10_000, progress=False)
    for bad in (1.5, 0.0, -2, True, float("nan")):
        with pytest.raises(gm.ConfigError, match="partial must be"):
            gm.merge([a, b], calibration, x, partial=bad, progress=False)

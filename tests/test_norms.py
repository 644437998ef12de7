"""Norm correction after a merge: REPAIR (the default) keeps a self-merge exact on any data,
BatchNorm models included, and leaves every merged unit with its target statistics where it
enters a nonlinearity or a norm; "reset" recomputes BatchNorm statistics (ZipIt!)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error
from graphmerge.lab.zoo.registry import builtin
from graphmerge.match.statistics import unit_sums
from graphmerge.surgery.repair import repair_points, targets

ARCHS = {
    "resnet": dict(depths=[1, 1, 1], width=1),
    "vgg": {},
    "mlp": {},
    "vit": dict(depth=1, dim=32, heads=4, mlp_dim=48),
}


def _unlike_training(x: torch.Tensor, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(k)
    return torch.randn(16, *x.shape[1:], generator=g) * 3 + 1


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_default_self_merge_is_exact_on_data_unlike_training(name):
    torch.manual_seed(0)
    model, x = builtin(name, **ARCHS[name])
    model.eval()
    calibration = [_unlike_training(x, k) for k in range(3)]
    twin = gm.permute(model, x, seed=1)
    result = gm.merge([model, twin], calibration, x, progress=False)
    assert result.config.norms == "repair"
    assert output_error(model, result.module, (calibration[0],)) < 1e-4
    if name in ("resnet", "vgg"):  # recomputed BatchNorm statistics change the function
        reset = gm.merge([model, twin], calibration, x, norms="reset", progress=False)
        assert output_error(model, reset.module, (calibration[0],)) > 1e-2


def _net(seed: int, width: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, 3)).eval()


@pytest.mark.parametrize("method", ["zip", "permute", "average"])
def test_every_point_gets_its_target_statistics(method):
    """Two independent models: after REPAIR, every merged unit's mean and std where it enters
    a nonlinearity or a norm equal the merge-weighted mean of its members'."""
    a, b = _net(0, 12), _net(1, 12)
    x = torch.randn(4, 6)
    calibration = [torch.randn(32, 6, generator=torch.Generator().manual_seed(k))
                   for k in range(3)]
    result = gm.merge([a, b], calibration, x, method=method, progress=False)
    traced = [gm.trace(m, x) for m in (a, b)]
    plans = result.plans
    points = repair_points(traced[0], set(plans))
    assert len(points) == 3  # the three hidden layers: ReLU, GELU, LayerNorm
    wanted = {p.node: p.dim for p in points}
    sums = [unit_sums(t.graph_module, wanted, _inputs(calibration), progress=False) for t in traced]
    after = unit_sums(result.module, wanted, _inputs(calibration), progress=False)
    for p in points:
        mean, std = targets(plans[p.space],
                            [s[p.node].moments() for s in sums])
        got_mean, got_std = after[p.node].moments()
        np.testing.assert_allclose(got_mean, mean, atol=1e-4)
        np.testing.assert_allclose(got_std, std, rtol=1e-4, atol=1e-5)


def test_batch_norm_points_set_running_statistics():
    """A BatchNorm point: the merged module's BN output has the target statistics, by its
    running statistics alone (weights untouched)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),  # noqa: E731
                                 nn.Conv2d(8, 4, 1)).eval()
    a, b = make(), make()
    for m in (a, b):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    calibration = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    result = gm.merge([a, b], calibration, x, progress=False)
    none = gm.merge([a, b], calibration, x, norms="none", progress=False)
    repaired, plain = result.module.state_dict(), none.module.state_dict()
    changed = {k for k in repaired if not torch.equal(repaired[k], plain[k])}
    assert changed == {"1.running_mean", "1.running_var"}
    traced = gm.trace(a, x)
    (point,) = repair_points(traced, set(result.plans))
    assert point.kind == "batch_norm"
    sums = [unit_sums(gm.trace(m, x).graph_module, {point.node: 1}, _inputs(calibration),
                      progress=False) for m in (a, b)]
    mean, std = targets(result.plans[point.space],
                        [s[point.node].moments() for s in sums])
    got = unit_sums(result.module, {point.node: 1}, _inputs(calibration),
                    progress=False)[point.node].moments()
    np.testing.assert_allclose(got[0], mean, atol=1e-4)
    np.testing.assert_allclose(got[1], std, rtol=1e-4, atol=1e-5)


def _inputs(batches: list[torch.Tensor]) -> list[tuple[torch.Tensor]]:
    """Calibration batches as the model-input tuples `unit_sums` reads."""
    return [(b,) for b in batches]


class _NormAct(nn.BatchNorm2d):
    """A norm+activation block as libraries write it: the functional norm, then ReLU."""

    def forward(self, x):
        return torch.relu(nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1,
            self.eps))


@pytest.mark.parametrize("norm, frontend", [(nn.BatchNorm2d, "fx"), (nn.BatchNorm2d, "export"),
                                            (_NormAct, "fx"), (_NormAct, "export")])
def test_reset_recomputes_batch_norms_that_are_calls_in_the_graph(norm, frontend):
    # an exported graph's aten batch norm and a traced F.batch_norm hold their running
    # statistics as graph buffers, not as BatchNorm modules: reset must recompute them too
    # (it used to leave them as merged, silently)
    def net(bn):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), bn(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    model = net(norm)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(64, 3, 8, 8)
    batches = [x[:32], x[32:]]
    merged = gm.merge([model, gm.permute(model, x, seed=1)], batches, norms="reset",
                      frontend=frontend, progress=False).module
    reference = net(nn.BatchNorm2d)  # the same weights in BatchNorm modules, reset by train mode
    reference.load_state_dict(model.state_dict())
    reference.train()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for b in batches:
            reference(b)
    assert output_error(merged, reference, (x,)) < 1e-5
    assert output_error(merged, model, (x,)) > 0.1

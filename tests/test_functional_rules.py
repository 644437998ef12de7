"""Axis rules of functional layer forms (issue 20): F.batch_norm inside norm+activation
BatchNorm2d subclasses, F.instance_norm, PReLU (module and F.prelu), F.bilinear, functional
activations, torch._assert shape checks inside forward, and resampling (nn.Upsample,
F.interpolate). Each model is checked on both
front ends: the permutation oracle passes, permuting changes weights (its spaces are free),
and merging a model with a permuted copy of itself gives the model back."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_capture import _randomise_norms
from torch import nn

import graphmerge as gm
from graphmerge.graph import axes, rules

FRONTENDS = ["fx", "export"]
X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


class BatchNormAct2d(nn.BatchNorm2d):
    """A norm+activation block as vision libraries write it: a BatchNorm2d subclass whose
    forward checks its input, calls F.batch_norm itself and then applies an activation."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(channels)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        torch._assert(x.shape[1] == self.num_features, "wrong channel count")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(x)


class FunctionalBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward is F.batch_norm alone (no activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


class InheritedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm2d's forward."""


class SuperActBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward is BatchNorm2d's followed by an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class ConvNet(nn.Module):
    """conv → norm → conv → norm → conv → norm → pool → linear, with norms of class `norms`."""

    def __init__(self, *norms: type[nn.Module]) -> None:
        super().__init__()
        widths = (3, 8, 12, 6)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in
                                   zip(widths, widths[1:]))
        self.norms = nn.ModuleList(norm(c) for norm, c in zip(norms, widths[1:]))
        self.head = nn.Linear(widths[-1], 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = norm(conv(x))
        return self.head(x.mean((2, 3)))


def _bn_act_net() -> nn.Module:
    return ConvNet(BatchNormAct2d, FunctionalBatchNorm2d,
                   lambda c: BatchNormAct2d(c, act=nn.SiLU))


class InstanceNormNet(nn.Module):
    """F.instance_norm with affine parameters, with running statistics, and without either."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 10, 3), nn.Conv2d(10, 6, 1)
        self.weight, self.bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("mean", torch.randn(10) * 0.2)
        self.register_buffer("var", torch.rand(10) + 0.5)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.instance_norm(self.a(x), weight=self.weight, bias=self.bias))
        x = F.instance_norm(self.b(x), self.mean, self.var, use_input_stats=False)
        x = F.gelu(F.instance_norm(self.c(F.silu(x))))
        return self.head(x.amax((2, 3)))


class PReLUNet(nn.Module):
    """nn.PReLU with one slope per channel and with one slope, and F.prelu on conv channels
    and on features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3)
        self.act_a, self.act_one = nn.PReLU(8), nn.PReLU()
        self.slope_b = nn.Parameter(torch.rand(6))
        self.fc, self.slope_fc = nn.Linear(6, 7), nn.Parameter(torch.rand(7))
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act_one(self.act_a(self.a(x)))
        x = F.prelu(self.b(x), self.slope_b).mean((2, 3))
        return self.head(F.prelu(self.fc(x), self.slope_fc))


class ActivationNet(nn.Module):
    """A functional activation of each kind between linear layers; F.bilinear at the end."""

    ACTS = (F.relu6, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu, F.tanhshrink,
            F.logsigmoid, F.softsign, F.hardshrink, F.softshrink, F.rrelu, F.celu, F.selu,
            lambda x: F.threshold(x, 0.1, -1.0), lambda x: F.softmin(x, -1),
            lambda x: F.gelu(x, approximate="tanh"), lambda x: F.hardtanh(x, -0.5, 0.5))

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3 * 8 * 8, 9)
        self.layers = nn.ModuleList(nn.Linear(9, 9) for _ in self.ACTS)
        self.w = nn.Parameter(torch.randn(4, 9, 9) * 0.1)
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))
        h = x
        for act, layer in zip(self.ACTS, self.layers):
            h = layer(act(h))
        return F.bilinear(h, x, self.w, self.bias)


class AssertNet(nn.Module):
    """Shape checks of the channel count and rank inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        torch._assert(h.shape[1] == self.a.out_channels, "channels")
        torch._assert(h.dim() == 4, "rank")
        h = h.mean((2, 3))
        torch._assert(h.size(1) == 8, "features")
        return self.b(h)


class ResampleNet(nn.Module):
    """A decoder that resamples its feature maps (module and functional forms, nearest and
    bilinear): interpolation acts on each channel's map alone, so the channels stay free."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, 2, 1), nn.Conv2d(6, 5, 3, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c = nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b(self.up(F.relu(self.a(x)))))
        h = F.interpolate(h, size=(5, 5), mode="bilinear", align_corners=False)
        return self.c(h).mean((2, 3))


MODELS = {
    "resample": (ResampleNet, 2),
    "bn-act": (_bn_act_net, 3),
    "instance-norm": (InstanceNormNet, 3),
    "prelu": (PReLUNet, 3),
    "activations": (ActivationNet, 1 + len(ActivationNet.ACTS)),
    "assert": (AssertNet, 1),
}


def _randomise(model: nn.Module) -> nn.Module:
    """float64, eval mode, and norm statistics and affine values away from their defaults."""
    return _randomise_norms(model).double().eval()


def _no_rule_warnings(fn, *args, **kwargs):
    """fn(*args, **kwargs), failing if any op had no axis rule."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    missing = [str(w.message) for w in caught if "no axis rule" in str(w.message)]
    assert not missing, missing
    return result


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_functional_rules(name, frontend):
    make, free = MODELS[name]
    model = _randomise(make())
    x = X
    traced = _no_rule_warnings(gm.trace, model, x, frontend=frontend)
    assert traced.frontend == frontend
    assert len(traced.space_table.free) == free
    report = gm.check_spaces(model, x, frontend=frontend)
    assert report.free_spaces == free and report.max_output_error < 1e-5
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, twin.state_dict()[k])]
    assert changed
    calibration = [torch.randn(16, *x.shape[1:], dtype=x.dtype, generator=torch.Generator()
                               .manual_seed(k)) for k in range(2)]
    result = gm.merge([model, twin], calibration, x, frontend=frontend, progress=False)
    with torch.no_grad():
        for batch in (x, calibration[0]):
            assert _rel(model(batch), result.module(batch)) < 1e-5


def test_norm_act_parameters_join_the_channel_space():
    """The affine values and running statistics that the subclass passes to F.batch_norm
    share the space of the conv output they normalise (as with the module rule)."""
    for frontend in FRONTENDS:
        table = gm.trace(_randomise(_bn_act_net()), X, frontend=frontend).space_table
        for i in range(3):
            space = table[table.param_axes[f"convs.{i}.weight"][0]]
            for stat in ("weight", "bias", "running_mean", "running_var"):
                assert table[table.param_axes[f"norms.{i}.{stat}"][0]] is space
            assert not space.frozen


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_batch_norm_subclass_kept_as_a_leaf(frontend):
    """A BatchNorm2d subclass with BatchNorm2d's forward has its module rule when kept as a
    leaf; one whose forward adds an activation does not (its axes are frozen, never linked
    as if it were a plain norm). torch.export sees through both."""
    for norm in (InheritedBatchNorm2d, SuperActBatchNorm2d):
        model = _randomise(ConvNet(norm, norm, norm))
        if frontend == "fx" and norm is SuperActBatchNorm2d:
            with pytest.warns(UserWarning, match="no axis rule for `SuperActBatchNorm2d`"):
                report = gm.check_spaces(model, X, frontend="fx", leaf_modules=[norm])
            assert report.free_spaces == 0
            continue
        report = gm.check_spaces(model, X, frontend=frontend, leaf_modules=[norm])
        assert report.free_spaces == 3 and report.max_output_error < 1e-5
        twin = gm.permute(model, X, seed=2, frontend=frontend, leaf_modules=[norm])
        result = gm.merge([model, twin], [X], frontend=frontend, leaf_modules=[norm],
                          progress=False)
        with torch.no_grad():
            assert _rel(model(X), result.module(X)) < 1e-5


def test_statistics_axes_are_reduced():
    """F.batch_norm in training mode reads its batch axis as a whole, F.instance_norm its
    spatial axes: the rules mark them reduced (so widening leaves them alone)."""

    class Net(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True) + F.instance_norm(x)

    for frontend in FRONTENDS:
        traced = gm.trace(Net(), X, frontend=frontend)
        reduced = {}
        for node in traced.graph_module.graph.nodes:
            rule = rules.rule_for(node, None)
            if node.op == "call_function" and "norm" in str(node.target):
                op = rules.Op(node, None, traced.shapes, traced.consts)
                reduced[op.name] = sorted(link.axis.dim for link in rule(op)
                                          if isinstance(link, axes.Keep) and link.reduced)
        assert reduced == {"batch_norm": [0], "instance_norm": [2, 3]}

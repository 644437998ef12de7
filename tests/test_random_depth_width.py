"""Random residual and plain architectures of random depths and widths (hypothesis): a model
comes back from a merge with its own deepened or widened permuted copy, and two independent
variants of one family merge into a finite model of the first one's output shape, or the merge
is refused with a GraphmergeError — never a raw exception."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error

KINDS = ("basic", "bottleneck", "layerscale", "plain", "plain_relu6", "plain_gelu")


class Unit(nn.Module):
    """One unit of depth of the given kind on `c` channels."""

    def __init__(self, kind: str, c: int, hidden: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "basic":        # relu(x + bn(conv(relu(bn(conv(x))))))
            self.f = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                                   nn.ReLU(), nn.Conv2d(hidden, c, 3, padding=1),
                                   nn.BatchNorm2d(c))
        elif kind == "bottleneck":  # x + conv(relu(conv(x)))
            self.f = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1))
        elif kind == "layerscale":  # x + gamma * conv(gelu(dwconv(x)))
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GELU(),
                                   nn.Conv2d(c, c, 1))
            self.gamma = nn.Parameter(0.1 * torch.ones(c, 1, 1))
        else:                       # act(bn(conv(x))), shape kept
            act = {"plain": nn.ReLU, "plain_relu6": nn.ReLU6, "plain_gelu": nn.GELU}[kind]
            self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "basic":
            return torch.relu(x + self.f(x))
        if self.kind == "bottleneck":
            return x + self.f(x)
        if self.kind == "layerscale":
            return x + self.gamma * self.f(x)
        return self.f(x)


class Net(nn.Module):
    """stem → (transition conv → units of a kind)* → pool → linear; the activation after each
    transition matches the stage's kind (ReLU6 before ReLU6 stacks)."""

    def __init__(self, kinds: list[str], depths: list[int], widths: list[int], hidden: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = 2
        for kind, depth, w in zip(kinds, depths, widths):
            act = nn.ReLU6() if kind == "plain_relu6" else nn.ReLU()
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), act]
            layers += [Unit(kind, w, hidden) for _ in range(depth)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


families = st.fixed_dictionaries({
    "kinds": st.lists(st.sampled_from(KINDS), min_size=1, max_size=3),
    "hidden": st.integers(2, 6),
})


def _build(family: dict, depths: list[int], widths: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return _trained_like(Net(family["kinds"], depths, widths, family["hidden"]), seed)


def _data(batch: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 2, 6, 6, generator=g) for _ in range(n)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=families, data=st.data())
def test_deepened_and_widened_copies_give_the_model_back(family, data):
    n = len(family["kinds"])
    depths = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n), "depths")
    extra = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n), "extra depth")
    # every transition changes the width: a width-keeping one is itself a plain unit, and
    # where it meets a stage of plain units the two models' stages may not correspond (the
    # independent-variants test below takes any widths, refusals allowed)
    steps = data.draw(st.lists(st.integers(1, 2), min_size=n, max_size=n), "width steps")
    widths = [2 + sum(steps[:k + 1]) for k in range(n)]
    seed = data.draw(st.integers(0, 2**16), "seed")
    model = _build(family, depths, widths, seed)
    reference = _build(family, [d + e for d, e in zip(depths, extra)], widths, seed + 1)
    x, calibration = _data(2, 1, seed)[0], _data(data.draw(st.sampled_from([2, 8])), 3, seed + 2)
    twin = gm.permute(model, x, seed=seed)
    refuse = any(k == "plain_gelu" and e for k, e in zip(family["kinds"], extra))
    if refuse:  # GELU is the identity on no interval: no identity unit exists
        with pytest.raises(gm.GraphmergeError, match="gelu"):
            gm.deepen(twin, x, reference)
        return
    deep = gm.deepen(twin, x, reference)
    assert output_error(model, deep, (calibration[0],)) < 1e-4
    wide = gm.widen(twin, x, extra=0.5, seed=seed)
    for other in (deep, wide):  # units placed as deepen placed them (CKA may tie)
        result = gm.merge([model, other], calibration, x, heads="average", norms="none",
                          align="uniform", progress=False)
        assert output_error(model, result.module, (calibration[0],)) < 1e-4


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=families, data=st.data())
def test_independent_variants_merge_or_refuse_clearly(family, data):
    n = len(family["kinds"])
    variants = [(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n), "depths"),
                 data.draw(st.lists(st.integers(2, 6), min_size=n, max_size=n), "widths"))
                for _ in range(2)]
    seed = data.draw(st.integers(0, 2**16), "seed")
    a, b = (_build(family, d, w, seed + k) for k, (d, w) in enumerate(variants))
    x = _data(2, 1, seed)[0]
    calibration = _data(data.draw(st.sampled_from([2, 8])), 3, seed + 2)
    try:
        result = gm.merge([a, b], calibration, x, heads="average", progress=False)
    except gm.GraphmergeError as e:
        assert str(e)  # a refusal says why
        event(f"refused: {str(e)[:60]}")
        return
    event("merged")
    with torch.no_grad():
        out, ref = result.module(calibration[0]), a(calibration[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()

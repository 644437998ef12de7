"""Slices along a transformable axis are index maps (DPN's `s[:, :r]`, `s[:, r:]`): the axis is
a cat of its pieces, a permutation keeps each piece's units within the piece, on fx and export
graphs; strided slices and bounds that are not literals freeze the axis with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error
from graphmerge.graph.rules.registry import Op
from graphmerge.graph.rules.shape import _getitem

CONV_X = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
LINEAR_X = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class ConvSlices(nn.Module):
    """A conv output cut in two by slices (DPN), both pieces read by their own layers; with
    `negative`, the same cut written with negative and None bounds."""

    def __init__(self, negative: bool = False) -> None:
        super().__init__()
        self.negative = negative
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.a, self.b = nn.Conv2d(5, 6, 1), nn.Conv2d(7, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        if self.negative:
            lo, hi = s[:, None:-7], s[:, -7:None]
        else:
            lo, hi = s[:, :5], s[:, 5:]
        y = torch.relu(self.a(lo)) + self.b(hi)
        return self.head(y.mean((2, 3)))


class LinearSlices(nn.Module):
    """A slice on the last axis of a linear output: three pieces, each read by a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 10)
        self.p, self.q, self.r = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(3, 4)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.p(h[..., :3]) * self.q(h[..., 3:7]) + self.r(h[:, 7:])


class Narrowed(nn.Module):
    """narrow(x, dim, start, length): the slice x[:, start:start + length]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.p, self.q = nn.Linear(5, 10), nn.Linear(4, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.p(h.narrow(1, 0, 4)) - self.q(torch.narrow(h, -1, 4, 6))


class Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(5, 8), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x))[:, ::2])


def _prepared(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
    return model


CASES = {  # name -> (model, input, weights a permuted twin must change)
    "conv": (lambda: ConvSlices(), CONV_X, ["stem.weight", "bn.weight", "a.weight", "b.weight"]),
    "conv_negative": (lambda: ConvSlices(negative=True), CONV_X, ["stem.weight", "a.weight",
                                                                  "b.weight"]),
    "linear_last_axis": (LinearSlices, LINEAR_X, ["fc.weight", "p.weight", "q.weight",
                                                  "r.weight"]),
    "narrow": (Narrowed, LINEAR_X, ["fc.weight", "p.weight", "q.weight"]),
}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_slices_are_index_maps(name, frontend):
    make, x, moved = CASES[name]
    model = _prepared(make())
    table = gm.trace(model, x, frontend=frontend).space_table
    whole = table[table.param_axes["stem.weight" if "conv" in name else "fc.weight"][0]]
    readers = {"conv": ["a", "b"], "conv_negative": ["a", "b"], "narrow": ["p", "q"]}.get(
        name, ["p", "q", "r"])
    pieces = tuple(table.param_axes[f"{r}.weight"][1] for r in readers)
    assert not whole.frozen and whole.derived is not None and whole.derived.kind == "cat"
    assert whole.derived.parts == pieces and len(set(pieces)) == len(pieces)
    assert not any(table[p].frozen for p in pieces)
    report = gm.check_spaces(model, x, frontend=frontend)
    assert report.max_output_error < 1e-9
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    state, permuted = model.state_dict(), twin.state_dict()
    assert [k for k in moved if torch.equal(state[k], permuted[k])] == []
    assert output_error(model, twin, (x,)) < 1e-9
    result = gm.merge([model, twin], [x], frontend=frontend, progress=False)
    assert {r.kind for r in result.coverage.reasons} <= {"GRAPH_OUTPUT"}
    assert output_error(model, result.module, (x,)) < 1e-6


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_slice_bounds_follow_the_merged_widths(name, frontend):
    """A merge to half the width moves every cut: the bounds are offsets of the pieces
    (negative ones from the end), rewritten from the merged widths of the pieces."""
    make, x, _ = CASES[name]
    model = _prepared(make())
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    calibration = [torch.randn(16, *x.shape[1:], dtype=torch.float64,
                               generator=torch.Generator().manual_seed(2))]
    result = gm.merge([model, twin], calibration, frontend=frontend, width=0.5,
                      heads="average", progress=False)
    merged = result.module
    readers = [m for m in merged.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][1:-1] \
        if "conv" in name else [m for m in merged.modules() if isinstance(m, nn.Linear)][1:]
    widths = [m.in_features if isinstance(m, nn.Linear) else m.in_channels for m in readers]
    assert sum(widths) < sum(CASES[name][0]().state_dict()[
        "stem.weight" if "conv" in name else "fc.weight"].shape[:1])  # narrower pieces
    with torch.no_grad():
        out = merged(x)
    assert out.shape == model(x).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_strided_slice_freezes_its_axis(frontend):
    model = _prepared(Strided())
    x = LINEAR_X
    table = gm.trace(model, x, frontend=frontend).space_table
    hidden = table[table.param_axes["fc.weight"][0]]
    assert hidden.frozen and "strided slice (step 2)" in hidden.why
    assert gm.check_spaces(model, x, frontend=frontend).max_output_error < 1e-9


def test_a_slice_bound_that_is_not_a_literal_freezes_the_axis():
    class Bound(nn.Module):
        def forward(self, x, n):
            return x[:, :n]

    graph = fx.symbolic_trace(Bound()).graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    op = Op(node, None, {"x": (2, 8), node.name: (2, 3)})  # `n` has no recorded value
    links = list(_getitem(op))
    assert [type(link).__name__ for link in links] == ["Same", "Freeze"]  # batch, sliced axis
    assert "not literals" in links[1].why and links[1].axis.dim == 1


def test_overlapping_slices_freeze_the_axis_with_a_reason():
    class Overlap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.a, self.b = nn.Linear(5, 8), nn.Linear(5, 2), nn.Linear(5, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.a(h[:, :5]) + self.b(h[:, 3:])

    model = _prepared(Overlap())
    table = gm.trace(model, LINEAR_X).space_table
    piece = table[table.param_axes["a.weight"][1]]
    assert piece.frozen and "overlap" in piece.why
    assert gm.check_spaces(model, LINEAR_X).max_output_error < 1e-9

"""Grouped convolutions and group norms: their channel axes are groups × units of one group
(like attention heads × head dim); a model with whole groups, and the units inside them,
permuted computes the same function and merges back into the original."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error


class ResNeXtBlock(nn.Module):
    """1×1 conv → BN → ReLU → 3×3 grouped conv → BN → ReLU → 1×1 conv, residual."""

    def __init__(self, c: int = 16, width: int = 16, groups: int = 4,
                 group_width: int | None = None) -> None:
        super().__init__()
        groups = width // group_width if group_width else groups
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(c, width, 1), nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn_b = nn.BatchNorm2d(width)
        self.c = nn.Conv2d(width, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn_a(self.a(x)))
        y = F.relu(self.bn_b(self.b(y)))
        x = F.relu(x + self.c(y))
        return self.head(x.mean((2, 3)))


class GroupNormCNN(nn.Module):
    """conv → GroupNorm(4, C) → ReLU → conv → GroupNorm(4, C) → ReLU → pool → linear."""

    def __init__(self, c: int = 16, groups: int = 4) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _eval(model: nn.Module) -> nn.Module:
    """Random batch-norm statistics (so a wrong permutation shows), float64, eval mode."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.normal_()
                m.bias.normal_()
    return model.double().eval()


MODELS = {
    "resnext": lambda: ResNeXtBlock(groups=4),
    "regnet": lambda: ResNeXtBlock(width=24, group_width=8),
    "group_norm": lambda: GroupNormCNN(),
}


def _model(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return _eval(MODELS[name]()), torch.randn(4, 3, 8, 8, dtype=torch.float64)


def _grouped(model: nn.Module) -> list[torch.Tensor]:
    """The weights of the grouped ops."""
    if isinstance(model, GroupNormCNN):
        return [model.gn1.weight, model.gn2.weight, model.conv1.weight]
    return [model.b.weight, model.bn_a.weight]


def test_grouped_conv_channels_are_groups_by_units():
    model, x = _model("resnext")
    table = gm.trace(model, x).space_table
    assert len(table.heads) == 1
    ((h, projections),) = table.heads.items()
    assert table[h].width == 4 and not table[h].frozen
    assert sorted(table[d].width for _, d in projections) == [4, 4]
    # the grouped conv's weight axis 1 reads the units of one group, alike in every group
    shared = [d for _, d in projections if d in table.shared_dims]
    assert len(shared) == 1 and table.param_axes["b.weight"][1] == shared[0]
    assert all(not table[k].frozen for k, _ in projections)


def test_group_norm_channels_are_groups_by_units():
    model, x = _model("group_norm")
    table = gm.trace(model, x).space_table
    assert len(table.heads) == 2 and not table.shared_dims
    for h, projections in table.heads.items():
        assert table[h].width == 4 and [table[d].width for _, d in projections] == [4]
        (k, _), = projections
        assert table.param_axes["gn1.weight"][0] == k or table.param_axes["gn2.weight"][0] == k
        assert table[k].reduced  # the statistics read every unit of a group


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_permuted_groups_merge_back(name, frontend):
    model, x = _model(name)
    gm.check_spaces(model, x, frontend=frontend)
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    assert output_error(model, twin, (x,)) < 1e-10
    for a, b in zip(_grouped(model), _grouped(twin)):
        assert not torch.equal(a, b)
    result = gm.merge([model, twin], [x], frontend=frontend, progress=False)
    assert output_error(model, result.module, (x,)) < 1e-5


def test_functional_grouped_conv_and_group_norm():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(12, 3, 3, 3))
            self.w2 = nn.Parameter(torch.randn(12, 4, 3, 3))
            self.gamma, self.beta = nn.Parameter(torch.randn(12)), nn.Parameter(torch.randn(12))
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(F.conv2d(x, self.w1, padding=1))
            y = F.conv2d(y, self.w2, padding=1, groups=3)
            y = F.relu(F.group_norm(y, 3, self.gamma, self.beta))
            return self.head(y.mean((2, 3)))

    torch.manual_seed(0)
    model, x = Functional().double().eval(), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    gm.check_spaces(model, x)
    twin = gm.permute(model, x, seed=2)
    assert not torch.equal(model.w2, twin.w2)
    result = gm.merge([model, twin], [x], progress=False)
    assert output_error(model, result.module, (x,)) < 1e-5


def test_depthwise_with_multiplier_moves_channels_with_their_outputs():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 12, 3, groups=6),
                          nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    model(x.float())
    model = model.double().eval()
    gm.check_spaces(model, x)
    twin = gm.permute(model, x, seed=3)
    assert not torch.equal(model[2].weight, twin[2].weight)


@pytest.mark.parametrize("name", ["resnext", "group_norm"])
def test_independent_models_merge(name):
    (a, x), (b, _) = _model(name, seed=0), _model(name, seed=1)
    batches = [torch.randn(8, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    result = gm.merge([a, b], batches, x, progress=False)
    out = result.module(x)
    assert out.shape == a(x).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", ["resnext", "group_norm"])
def test_models_with_different_numbers_of_groups_merge(name, frontend):
    """Groups of 4 units: 4 groups in one model, 6 in the other; the merged model has 6
    groups of 4 (the group count follows the widest model, as heads do)."""
    torch.manual_seed(0)
    make = ((lambda g: ResNeXtBlock(width=4 * g, groups=g)) if name == "resnext"
            else (lambda g: GroupNormCNN(c=4 * g, groups=g)))
    a, b = _eval(make(4)), _eval(make(6))
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    batches = [torch.randn(8, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    result = gm.merge([a, b], batches, x, frontend=frontend, progress=False)
    out = result.module(x)
    assert out.shape == a(x).shape and torch.isfinite(out).all()
    widths = sorted(p.width for p in result.plans.values())
    assert 6 in widths and 24 in widths


SMALL = {
    # a group norm and a grouped convolution on one channel axis: one groups space
    "group_norm_then_grouped_conv": lambda: nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4),
        nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 4, 1)),
    "transposed": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 12, 3, groups=4), nn.ReLU(),
        nn.Conv2d(12, 4, 1)),
    "flattened": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 4)),
    "one_group": lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
}


GROUPED_LAYER = {"group_norm_then_grouped_conv": 3, "transposed": 2, "flattened": 2,
                 "one_group": 1}  # the grouped op's position in the Sequential


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_grouped_layouts_merge_back(name, frontend):
    torch.manual_seed(0)
    model, x = _eval(SMALL[name]()), torch.randn(2, 3, 6, 6, dtype=torch.float64)
    table = gm.trace(model, x, frontend=frontend).space_table
    assert bool(table.heads) == (name != "one_group")
    gm.check_spaces(model, x, frontend=frontend)
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    k = GROUPED_LAYER[name]
    assert not torch.equal(model[k].weight, twin[k].weight)
    result = gm.merge([model, twin], [x], frontend=frontend, progress=False)
    assert output_error(model, result.module, (x,)) < 1e-5


def test_channels_grouped_two_ways_keep_the_identity_with_a_reason():
    model = _eval(nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.GroupNorm(2, 16), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=4),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    table = gm.trace(model, x).space_table
    space = table[table.param_axes["1.weight"][0]]
    assert space.frozen and "grouped in two incompatible ways" in space.why
    gm.check_spaces(model, x)

"""Uneven channel splits (Res2Net, EdgeNeXt), patch unfolding through reshapes and permutes
(MobileViT) and weight standardisation: the oracle holds, the spaces are free, a permuted twin
moves the weights, and merging it with the model gives the model back (fx and export)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Res2Block(nn.Module):
    """1×1 conv, a split into unequal pieces, a 3×3 conv per piece fed the previous piece's
    output too, the last piece kept as it is, cat, 1×1 conv, residual."""

    def __init__(self, sizes: tuple[int, ...], channels: int = 8) -> None:
        super().__init__()
        self.sizes = list(sizes)
        width = sum(sizes)
        self.inp, self.bn = nn.Conv2d(channels, width, 1), nn.BatchNorm2d(width)
        self.convs = nn.ModuleList(nn.Conv2d(s, s, 3, padding=1) for s in sizes[:-1])
        self.out = nn.Conv2d(width, channels, 1)

    def forward(self, x):
        pieces = torch.split(torch.relu(self.bn(self.inp(x))), self.sizes, dim=1)
        outs, prev = [], None
        for k, conv in enumerate(self.convs):
            prev = torch.relu(conv(pieces[k] if prev is None else pieces[k] + prev))
            outs.append(prev)
        outs.append(pieces[-1])
        return x + self.out(torch.cat(outs, dim=1))


class Res2Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Res2Block((6, 6, 4)), Res2Block((5, 5, 3)))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class EdgeSplit(nn.Module):
    """EdgeNeXt-style: a depthwise conv per unequal piece, cat; then an uneven split that is
    put back together in another order, and a chunk of 13 channels into 5, 5 and 3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 1)
        self.dw = nn.ModuleList(nn.Conv2d(s, s, 3, padding=1, groups=s) for s in (7, 5))
        self.mix = nn.Conv2d(12, 10, 1)
        self.grow = nn.Conv2d(10, 13, 1)
        self.head = nn.Conv2d(13, 4, 1)

    def forward(self, x):
        y = self.stem(x)
        a, b = y.split([7, 5], dim=1)
        y = y + torch.cat([self.dw[0](a), self.dw[1](b)], 1)
        p, q, r = torch.split(self.mix(torch.relu(y)), [2, 3, 5], 1)
        z = self.grow(torch.cat([torch.relu(r), p, q * 2], 1))
        u, v, w = z.chunk(3, dim=1)
        return self.head(torch.cat([u, torch.relu(v), w], 1)).mean((2, 3))


class SplitRemainder(nn.Module):
    """split(x, 6) of 16 channels (6, 6, 4), a conv per piece, cat in reverse order, then
    tensor_split at [4, 10] (the same pieces) and a cat in yet another order."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 1)
        self.convs = nn.ModuleList(nn.Conv2d(k, k, 3, padding=1) for k in (6, 6, 4))

    def forward(self, x):
        pieces = torch.split(self.a(x), 6, dim=1)
        ys = [torch.relu(conv(pieces[k])) for k, conv in enumerate(self.convs)]
        t = torch.tensor_split(torch.cat(ys[::-1], 1), [4, 10], dim=1)
        return self.b(torch.cat([t[2], t[0], t[1]], 1)).mean((2, 3))


class PatchMLP(nn.Module):
    """MobileViT-style: [B, C, H, W] -> patches [B·p·p, h·w, C] by a 6-d reshape and a
    permute, LayerNorm and an MLP on C, folded back, 1×1 conv."""

    def __init__(self, c: int = 6, d: int = 8, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.proj_in, self.norm = nn.Conv2d(c, d, 1), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 10), nn.GELU(), nn.Linear(10, d))
        self.proj_out = nn.Conv2d(d, c, 1)

    def forward(self, x):
        y = self.proj_in(x)
        B, C, H, W = y.shape
        p = self.patch
        h, w = H // p, W // p
        t = y.reshape(B, C, h, p, w, p).permute(0, 3, 5, 2, 4, 1).reshape(B * p * p, h * w, C)
        t = t + self.mlp(self.norm(t))
        t = t.reshape(B, p, p, h, w, C).permute(0, 5, 3, 1, 4, 2).reshape(B, C, H, W)
        return x + self.proj_out(t)


class PatchAttention(nn.Module):
    """MobileViT as some libraries write it: channels folded into the batch on the way
    ([B·C·h, p, w, p], transposes, [B, C, h·w, p·p]), attention and an MLP on C, folded back
    the same way, a 1×1 conv and a fusion conv over the cat with the input."""

    def __init__(self, c: int = 6, d: int = 8, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        self.local, self.proj_in = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, d, 1)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 12), nn.GELU(), nn.Linear(12, d))
        self.proj_out, self.fuse = nn.Conv2d(d, c, 1), nn.Conv2d(2 * c, c, 3, padding=1)

    def forward(self, x):
        y = self.proj_in(self.local(x))
        B, C, H, W = y.shape
        p = self.patch
        h, w = H // p, W // p
        t = y.reshape(B * C * h, p, w, p).transpose(1, 2)
        t = t.reshape(B, C, h * w, p * p).transpose(1, 3).reshape(B * p * p, h * w, C)
        n = self.norm1(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        t = t.reshape(B, p * p, h * w, C).transpose(1, 3).reshape(B * C * h, w, p, p)
        t = t.transpose(1, 2).reshape(B, C, H, W)
        return self.fuse(torch.cat([x, self.proj_out(t)], 1))


class Patches(nn.Module):
    def __init__(self, block: type[nn.Module]) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 6, 3, padding=1), block(), nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


class StdConv(nn.Conv2d):
    """A conv whose weight is standardised per output unit before use, in one of the ways
    libraries write it: mean/std, torch.var_mean, or F.batch_norm over [1, out, in·k·k]."""

    def __init__(self, *args, mode: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode

    def forward(self, x):
        w = self.weight
        if self.mode == "std":
            w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
                w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        elif self.mode == "var_mean":
            var, mean = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
            w = (w - mean) * torch.rsqrt(var + 1e-5)
        else:
            w = F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-5).reshape_as(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.c1 = StdConv(3, 8, 3, padding=1, mode=mode)
        self.c2 = StdConv(8, 12, 3, padding=1, mode=mode)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


# name -> (model, free spaces on fx, on export, weights a permuted twin must change)
CASES = {
    "res2net": (Res2Net, 13, 13, ["blocks.0.convs.0.weight", "blocks.1.convs.1.weight",
                                  "blocks.0.out.weight", "blocks.1.inp.weight"]),
    "edge_split": (EdgeSplit, 13, 13, ["dw.0.weight", "dw.1.weight", "mix.weight",
                                       "grow.weight", "head.weight"]),
    "patch_mlp": (lambda: Patches(PatchMLP), 3, 3, ["block.norm.weight", "block.mlp.0.weight",
                                                   "block.proj_out.weight"]),
    "ws_std": (lambda: StdNet("std"), 2, 2, ["c1.weight", "c2.weight", "head.weight"]),
    "ws_var_mean": (lambda: StdNet("var_mean"), 2, 2, ["c1.weight", "c2.weight"]),
}
# these fold channels into the batch axis (B·C·h), into a reshaped weight [1, out, in·k·k],
# or concatenate pieces in an order no parameter reads: that derived axis has no parameter of
# its own, and is a space because a part of it is free
KEPT_DERIVED = {
    "patch_attention": (lambda: Patches(PatchAttention), 9, 13, [
        "block.proj_in.weight", "block.norm1.weight", "block.attn.in_proj_weight",
        "block.proj_out.weight"]),
    "ws_batch_norm": (lambda: StdNet("batch_norm"), 3, 3, ["c1.weight", "c2.weight"]),
    "split_remainder": (SplitRemainder, 9, 9, ["a.weight", "convs.0.weight", "convs.1.weight",
                                               "b.weight"]),
}
PARAMS = [pytest.param(n, id=n) for n in {**CASES, **KEPT_DERIVED}]


def _model(name: str) -> tuple[nn.Module, int, int, list[str]]:
    make, fx_free, export_free, moved = {**CASES, **KEPT_DERIVED}[name]
    torch.manual_seed(0)
    model = make().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):  # not all ones: a permutation shows
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model, fx_free, export_free, moved


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", PARAMS)
def test_oracle_permute_and_self_merge(name, frontend):
    model, fx_free, export_free, moved = _model(name)
    x = X.double()
    report = gm.check_spaces(model, x, frontend=frontend)
    assert report.max_output_error < 1e-5
    assert report.free_spaces == (fx_free if frontend == "fx" else export_free)
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    state, permuted = model.state_dict(), twin.state_dict()
    assert [k for k in moved if torch.equal(state[k], permuted[k])] == []
    calibration = [x, torch.randn(4, 3, 8, 8, dtype=torch.float64)]
    result = gm.merge([model, twin], calibration, frontend=frontend, progress=False)
    assert output_error(model, result.module, (calibration[1],)) < 1e-5


@pytest.mark.parametrize("mode", ["std", "var_mean", "batch_norm"])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_standardised_weight_keeps_its_roles(mode, frontend):
    """Axis 0 of a weight standardised before use writes the conv's output space, axis 1
    reads its input space, as for a weight passed directly."""
    table = gm.trace(StdNet(mode), X, frontend=frontend).space_table
    out = table[table.param_axes["c2.weight"][0]]
    inp = table[table.param_axes["c2.weight"][1]]
    assert [(a.param, a.dim) for a in out.producers if a.param == "c2.weight"] == [
        ("c2.weight", 0)]
    assert [(a.param, a.dim) for a in inp.consumers if a.param == "c2.weight"] == [
        ("c2.weight", 1)]
    assert inp is table[table.param_axes["c1.weight"][0]]
    assert out is table[table.param_axes["head.weight"][1]]


class Regroup(nn.Module):
    """Two k ↔ m reshapes of [B, 6, C]: (6, 3) -> (2, 9), where 9 = 3 positions × the 3
    channels of `a` (an index map), and (6, 4) -> (4, 6), which mixes positions and channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(3, 7)
        self.c, self.d = nn.Linear(5, 4), nn.Linear(4, 7)

    def forward(self, x):  # x [B, 6, 5]
        y = torch.relu(self.a(x).reshape(-1, 2, 9)).reshape(-1, 6, 3)
        z = torch.relu(self.c(x).reshape(-1, 4, 6)).reshape(-1, 6, 4)
        return self.b(y).sum(1) + self.d(z).sum(1)


def test_a_reshape_that_mixes_positions_and_channels_is_frozen():
    table = gm.trace(Regroup(), torch.randn(2, 6, 5)).space_table
    frozen = table[table.param_axes["c.weight"][0]]
    assert frozen.frozen and "regroups" in frozen.why
    hidden = table[table.param_axes["a.weight"][0]]
    assert not hidden.frozen and hidden is table[table.param_axes["b.weight"][1]]


def test_a_reshape_that_regroups_factors_follows_them():
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    table = gm.trace(Regroup().double(), x).space_table
    hidden = table[table.param_axes["a.weight"][0]]
    nine = table.space_of("reshape", 2)
    assert nine is not None and nine.derived.parts == (None, hidden.id)
    assert nine.derived.kind == "kron" and nine.derived.sizes == (3, 3)
    report = gm.check_spaces(Regroup().double(), x)
    assert report.max_output_error < 1e-5 and report.free_spaces == 2

"""Random architectures of every op family through the full merge (hypothesis).

A drawn architecture mixes linear, conv1d, conv2d and depthwise layers, batch/layer/group
norms, ReLU/GELU/SiLU/tanh/sigmoid, residual adds, concatenations and chunks, multiplicative
gates (sigmoid, softmax), reshapes, transposes and flattening, pooling, attention (matmuls and
a softmax), token mixing, functional layers on bare parameters and tied weights. For each one:

- homogeneous: the model merged with its own permuted copy under default options gives the
  model back (relative error < 1e-4), or the merge is refused with a `GraphmergeError`; at least
  70% of the drawn models must merge (checked by the last test over the whole run);
- heterogeneous: for some draws, a variant of another depth and width from another seed; the
  merge gives a finite output of the first model's shape, or a `GraphmergeError`.

Any other exception fails. `tests/test_random_depth_width.py` fuzzes residual conv stacks of
random depths and widths; this file covers the op families.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid}

#: the input of each kind of model: [batch, *shape]; channels last for "vec" and "seq"
INPUTS = {"vec": (5,), "seq": (4, 5), "sig": (3, 8), "img": (3, 6, 6)}

#: the blocks each kind of model draws from
BLOCKS = {
    "vec": ("dense", "dense_norm", "residual", "gate", "cat", "functional", "tied", "reshape",
            "chunk", "softmax_gate"),
    "seq": ("dense", "dense_norm", "residual", "gate", "cat", "functional", "tied",
            "attention", "token_mix", "chunk", "softmax_gate"),
    "sig": ("conv", "conv_res", "depthwise", "group_norm", "cat", "gate", "pool"),
    "img": ("conv", "conv_res", "depthwise", "group_norm", "cat", "gate", "pool"),
}
DEPTH_UNITS = ("residual", "conv_res", "attention", "token_mix")  # blocks a variant may repeat or drop


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    width: int
    act: str
    option: int  # a small choice of each block's own (norm kind, heads, groups, pool kind …)


@dataclass(frozen=True)
class Spec:
    mode: str
    blocks: tuple[BlockSpec, ...]
    head: str  # "mean" or "flatten"


# ---- the blocks ----------------------------------------------------------------------------


class Dense(nn.Module):
    """act(linear(x)) on the last axis, a norm between them with `norm`."""

    def __init__(self, c: int, w: int, act: str, norm: str | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(c, w)
        self.norm = {None: nn.Identity(), "layer": nn.LayerNorm(w),
                     "batch": nn.BatchNorm1d(w)}[norm]
        self.act = ACTS[act]()

    def forward(self, x):
        return self.act(self.norm(self.fc(x)))


class Residual(nn.Module):
    """x + gamma * fc2(act(fc1(x))), gamma a layer scale on the channels."""

    def __init__(self, c: int, w: int, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(c, w), nn.Linear(w, c), ACTS[act]()
        self.gamma = nn.Parameter(0.5 + torch.rand(c))

    def forward(self, x):
        return x + self.gamma * self.fc2(self.act(self.fc1(x)))


class Gate(nn.Module):
    """a(x) * sigmoid(b(x)): a multiplicative gate (channels on `dim`)."""

    def __init__(self, c: int, w: int, act: str, conv: int = 0) -> None:
        super().__init__()
        layer = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d}[conv]
        args = (1,) if conv else ()
        self.a, self.b, self.act = layer(c, w, *args), layer(c, w, *args), ACTS[act]()

    def forward(self, x):
        return self.act(self.a(x)) * torch.sigmoid(self.b(x))


class Cat(nn.Module):
    """act(cat([a(x), b(x)])) along the channels: two widths side by side."""

    def __init__(self, c: int, w: int, act: str, conv: int = 0) -> None:
        super().__init__()
        layer = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d}[conv]
        args = (3,) if conv else ()
        kwargs = {"padding": 1} if conv else {}
        self.a = layer(c, w, *args, **kwargs)
        self.b = layer(c, w // 2 + 1, *args, **kwargs)
        self.dim, self.act = (1 if conv else -1), ACTS[act]()

    def forward(self, x):
        return self.act(torch.cat([self.a(x), self.b(x)], self.dim))


class Functional(nn.Module):
    """act(F.linear(x, w, b)) on bare parameters."""

    def __init__(self, c: int, w: int, act: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(w, c) / math.sqrt(c))
        self.bias = nn.Parameter(0.1 * torch.randn(w))
        self.act = ACTS[act]

    def forward(self, x):
        return self.act()(F.linear(x, self.weight, self.bias))


class Reshape(nn.Module):
    """fc(x) seen as [B, 2, w]: act, a norm over w with `norm`, then flattened back."""

    def __init__(self, c: int, w: int, act: str, norm: bool) -> None:
        super().__init__()
        self.fc, self.act, self.w = nn.Linear(c, 2 * w), ACTS[act](), w
        self.norm = nn.LayerNorm(w) if norm else nn.Identity()

    def forward(self, x):
        return torch.flatten(self.norm(self.act(self.fc(x).view(x.shape[0], 2, self.w))), 1)


class Chunk(nn.Module):
    """GLU by chunks: a, b = fc(x).chunk(2, -1); act(a) * sigmoid(b)."""

    def __init__(self, c: int, w: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(c, 2 * w), ACTS[act]()

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.act(a) * torch.sigmoid(b)


class SoftmaxGate(nn.Module):
    """x * softmax(fc(x)) + shift: a gate over the channels, a functional shift after it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.shift = nn.Parameter(0.1 * torch.randn(c))

    def forward(self, x):
        return x * torch.softmax(self.fc(x), dim=-1) + self.shift


class TokenMix(nn.Module):
    """x + (MLP over the tokens)ᵀ, x: [B, T, C] (MLP-Mixer): a hidden width over positions."""

    def __init__(self, t: int, w: int, act: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(t, w), nn.Linear(w, t), ACTS[act]()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class Tied(nn.Module):
    """One layer applied twice: its input and output channels are one space."""

    def __init__(self, c: int, act: str) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(c, c), ACTS[act]()

    def forward(self, x):
        return self.act(self.fc(self.act(self.fc(x))))


class Attention(nn.Module):
    """x + proj(softmax(q kᵀ / √d) v) over `heads` heads of `d` dims, x: [B, T, C]; written
    out with matmuls, or with F.scaled_dot_product_attention (`sdpa`)."""

    def __init__(self, c: int, d: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.d, self.sdpa = heads, d, sdpa
        self.q, self.k, self.v = (nn.Linear(c, heads * d) for _ in range(3))
        self.proj = nn.Linear(heads * d, c)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.d).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d), dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(b, t, self.heads * self.d))


class TiedPair(nn.Module):
    """Two layers sharing one weight (and each its own bias): b.weight is a.weight."""

    def __init__(self, c: int, act: str) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(c, c), nn.Linear(c, c), ACTS[act]()
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


class Conv(nn.Module):
    """act(norm(conv(x))) in 1 or 2 spatial dims; a depthwise conv first with `depthwise`."""

    def __init__(self, c: int, w: int, act: str, dims: int, bn: bool,
                 depthwise: bool = False) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.dw = conv(c, c, 3, padding=1, groups=c) if depthwise else nn.Identity()
        self.conv = conv(c, w, 1 if depthwise else 3, padding=0 if depthwise else 1)
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.norm, self.act = (norm(w) if bn else nn.Identity()), ACTS[act]()

    def forward(self, x):
        return self.act(self.norm(self.conv(self.dw(x))))


class ConvResidual(nn.Module):
    """x + bn(conv(act(conv(x)))) in 1 or 2 spatial dims."""

    def __init__(self, c: int, w: int, act: str, dims: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.f = nn.Sequential(conv(c, w, 3, padding=1), ACTS[act](), conv(w, c, 3, padding=1),
                               norm(c))

    def forward(self, x):
        return x + self.f(x)


class GroupNormAct(nn.Module):
    def __init__(self, c: int, act: str, groups: int) -> None:
        super().__init__()
        self.norm, self.act = nn.GroupNorm(groups, c), ACTS[act]()

    def forward(self, x):
        return self.act(self.norm(x))


class Pool(nn.Module):
    def __init__(self, dims: int, kind: int) -> None:
        super().__init__()
        pools = ((nn.MaxPool1d, nn.AvgPool1d), (nn.MaxPool2d, nn.AvgPool2d))[dims - 1]
        self.pool = pools[kind](2, ceil_mode=True)

    def forward(self, x):
        return self.pool(x)


def block(spec: BlockSpec, c: int, mode: str) -> tuple[nn.Module, int]:
    """The module of a block spec on `c` channels, and its output channels."""
    k, w, act, o = spec.kind, spec.width, spec.act, spec.option
    dims = {"sig": 1, "img": 2}.get(mode, 0)
    if k == "dense":
        return Dense(c, w, act), w
    if k == "dense_norm":
        return Dense(c, w, act, "batch" if mode == "vec" and o % 2 else "layer"), w
    if k == "residual":
        return Residual(c, w, act), c
    if k == "gate":
        return Gate(c, w, act, dims), w
    if k == "cat":
        return Cat(c, w, act, dims), w + w // 2 + 1
    if k == "functional":
        return Functional(c, w, act), w
    if k == "tied":
        return (TiedPair(c, act) if o % 2 else Tied(c, act)), c
    if k == "reshape":
        return Reshape(c, w, act, bool(o % 2)), 2 * w
    if k == "chunk":
        return Chunk(c, w, act), w
    if k == "softmax_gate":
        return SoftmaxGate(c), c
    if k == "token_mix":
        return TokenMix(INPUTS["seq"][0], w, act), c
    if k == "attention":
        return Attention(c, max(1, w // 2), 1 + o % 2, sdpa=o >= 3), c
    if k == "conv":
        return Conv(c, w, act, dims, bn=bool(o % 2)), w
    if k == "depthwise":
        return Conv(c, w, act, dims, bn=bool(o % 2), depthwise=True), w
    if k == "conv_res":
        return ConvResidual(c, w, act, dims), c
    if k == "group_norm":
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        return GroupNormAct(c, act, divisors[o % len(divisors)]), c
    if k == "pool":
        return Pool(dims, o % 2), c
    raise AssertionError(k)


class FuzzNet(nn.Module):
    """blocks → head ("mean": average over positions; "flatten": every position's channels
    into one linear layer)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        shape = INPUTS[spec.mode]
        c = shape[0] if spec.mode in ("sig", "img") else shape[-1]
        layers = []
        for b in spec.blocks:
            module, c = block(b, c, spec.mode)
            layers.append(module)
        self.body = nn.Sequential(*layers)
        self.mode, self.head_kind = spec.mode, spec.head
        with torch.no_grad():
            out = self.body(torch.zeros(2, *shape))
        features = c if spec.head == "mean" or spec.mode == "vec" else out[0].numel()
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        x = self.body(x)
        if self.mode != "vec":
            if self.head_kind == "flatten":
                x = torch.flatten(x, 1)
            else:
                x = x.mean(1) if self.mode == "seq" else x.flatten(2).mean(-1)
        return self.head(x)


def build(spec: Spec, seed: int) -> nn.Module:
    """The model of `spec` with weights from `seed` and norms that look trained (running
    statistics and affine parameters away from their initial values), in eval mode."""
    torch.manual_seed(seed)
    model = FuzzNet(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.7, 1.3)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


# ---- strategies ----------------------------------------------------------------------------


@st.composite
def specs(draw) -> Spec:
    mode = draw(st.sampled_from(sorted(INPUTS)), "mode")
    n = draw(st.integers(1, 4), "blocks")
    blocks = []
    pools = 0
    for _ in range(n):
        kind = draw(st.sampled_from(BLOCKS[mode]))
        if kind == "pool":
            if pools >= 2:
                kind = "conv"
            pools += 1
        blocks.append(BlockSpec(kind, draw(st.integers(3, 12)), draw(st.sampled_from(
            sorted(ACTS))), draw(st.integers(0, 5))))
    return Spec(mode, tuple(blocks), draw(st.sampled_from(["mean", "flatten"]), "head"))


def variant(spec: Spec, draw) -> Spec:
    """`spec` of another depth (depth units repeated or dropped) and other widths."""
    blocks = []
    for b in spec.blocks:
        wider = replace(b, width=b.width + draw(st.integers(0, 3)))
        copies = draw(st.integers(0, 2)) if b.kind in DEPTH_UNITS else 1
        blocks += [wider] * copies
    return replace(spec, blocks=tuple(blocks))


def data(spec: Spec, batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, *INPUTS[spec.mode], generator=torch.Generator().manual_seed(seed))


# ---- the tests -----------------------------------------------------------------------------

OUTCOMES: collections.Counter = collections.Counter()


def _refused(kind: str, error: gm.GraphmergeError) -> None:
    assert str(error).strip(), "a refusal says why"
    OUTCOMES[f"{kind} refused"] += 1
    event(f"{kind}: refused ({type(error).__name__}: {str(error)[:50]})")


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), draw=st.data())
def test_random_architectures_merge_or_refuse_clearly(spec, draw):
    seed = draw.draw(st.integers(0, 2**16), "seed")
    batch = draw.draw(st.integers(2, 8), "batch")
    model = build(spec, seed)
    x = data(spec, batch, seed)
    calibration = [data(spec, batch, seed + 1), data(spec, batch, seed + 2)]
    try:
        twin = gm.permute(model, x, seed=seed)
        result = gm.merge([model, twin], calibration, x, progress=False)
    except gm.GraphmergeError as e:
        _refused("self", e)
    else:
        error = output_error(model, result.module, (calibration[0],))
        assert error < 1e-4, f"self-merge of {spec} changed the model: relative error {error:.1e}"
        OUTCOMES["self merged"] += 1
        event("self: merged exactly")
    if not draw.draw(st.booleans(), "heterogeneous"):
        return
    other = variant(spec, draw.draw)
    b = build(other, seed + 7)
    try:
        result = gm.merge([model, b], calibration, x, progress=False)
    except gm.GraphmergeError as e:
        _refused("other", e)
        return
    with torch.no_grad():
        out, ref = result.module(calibration[0]), model(calibration[0])
    assert out.shape == ref.shape and torch.isfinite(out).all(), f"{spec} with {other}"
    OUTCOMES["other merged"] += 1
    event("other: merged")


def test_most_random_architectures_merge():
    """Refusing everything would pass the test above: at least 70% of the drawn models must
    merge with their permuted copy."""
    total = OUTCOMES["self merged"] + OUTCOMES["self refused"]
    if total == 0:
        pytest.skip("run with test_random_architectures_merge_or_refuse_clearly")
    assert total >= 300 and OUTCOMES["self merged"] / total >= 0.7, dict(OUTCOMES)


def test_the_generator_covers_every_block_and_runs():
    """Every block of every kind of model builds and runs (the strategy can draw it)."""
    for mode, kinds in BLOCKS.items():
        for kind in kinds:
            for option in range(6):
                spec = Spec(mode, (BlockSpec(kind, 4, "relu", option),), "flatten")
                assert build(spec, 0)(data(spec, 2, 0)).shape == (2, 3)


MIXER = Spec("seq", (BlockSpec("dense", 8, "silu", 0), BlockSpec("token_mix", 10, "relu", 0)),
             "mean")


def _self_merge(spec: Spec) -> float:
    model = build(spec, 0)
    x, calibration = data(spec, 4, 0), [data(spec, 4, 1)]
    result = gm.merge([model, gm.permute(model, x, seed=1)], calibration, x, progress=False)
    return output_error(model, result.module, (calibration[0],))


def test_a_token_mixing_mlp_on_free_channels_merges_exactly():
    """Its hidden units are read with the (permuted) channels along the samples: their
    features are averaged over the channels first, so the rows of both models correspond
    (compared position by position, the merge was off by ~5e-2)."""
    assert _self_merge(MIXER) < 1e-4

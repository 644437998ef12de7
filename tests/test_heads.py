"""Head-aware attention: heads are told from head dims by the graph, a model whose heads and
whose dims inside each head are permuted (each head by its own permutation) computes the same
function and merges back into it, and models with different numbers of heads merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error
from graphmerge.lab.zoo.registry import build, builtin
from graphmerge.match.heads import match_heads
from graphmerge.match.matchers import get_matcher

HEADS, HEAD_DIM = 4, 8


def _vit(**kwargs) -> tuple[nn.Module, torch.Tensor]:
    model, x = builtin("vit", batch=4, dim=HEADS * HEAD_DIM, depth=2, heads=HEADS, mlp_dim=48,
                       **kwargs)
    return model, x


def _per_head_permuted(model: nn.Module, seed: int) -> nn.Module:
    """Every block's heads permuted, and inside each head the query/key dims by one
    permutation and the value/output dims by another, different for every head."""
    g = torch.Generator().manual_seed(seed)
    twin = build("vit", dim=HEADS * HEAD_DIM, depth=2, heads=HEADS, mlp_dim=48).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in twin.blocks:
            heads = torch.randperm(HEADS, generator=g)
            qk = [torch.randperm(HEAD_DIM, generator=g) for _ in range(HEADS)]
            vo = [torch.randperm(HEAD_DIM, generator=g) for _ in range(HEADS)]
            rows_qk = torch.cat([heads[h] * HEAD_DIM + qk[h] for h in range(HEADS)])
            rows_vo = torch.cat([heads[h] * HEAD_DIM + vo[h] for h in range(HEADS)])
            attn = block.attn
            for layer, rows in ((attn.q, rows_qk), (attn.k, rows_qk), (attn.v, rows_vo)):
                layer.weight.copy_(layer.weight[rows])
                layer.bias.copy_(layer.bias[rows])
            attn.proj.weight.copy_(attn.proj.weight[:, rows_vo])
    return twin


def test_heads_are_told_from_head_dims():
    model, x = _vit()
    table = gm.trace(model, x).space_table
    assert len(table.heads) == 2  # one heads space per block
    for h, projections in table.heads.items():
        assert table[h].width == HEADS and len(projections) == 4  # q, k, v, output projection
        dims = {d for _, d in projections}
        assert len(dims) == 2 and {table[d].width for d in dims} == {HEAD_DIM}  # qk and vo
        assert all(table[k].width == HEADS * HEAD_DIM for k, _ in projections)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_each_head_permuted_by_its_own_transform_merges_back(frontend):
    model, x = _vit()
    twin = _per_head_permuted(model, seed=3)
    calibration = [torch.randn(16, *x.shape[1:]) for _ in range(3)]
    assert output_error(model, twin, (calibration[0],)) < 1e-5  # the same function
    assert not torch.equal(twin.blocks[0].attn.q.weight, model.blocks[0].attn.q.weight)
    result = gm.merge([model, twin], calibration, x, heads="average", norms="none",
                      frontend=frontend, progress=False)
    assert output_error(model, result.module, (calibration[0],)) < 1e-4


def test_models_with_different_numbers_of_heads_merge():
    small, x = _vit()
    torch.manual_seed(1)
    large = build("vit", dim=6 * HEAD_DIM, depth=2, heads=6, mlp_dim=72).eval()
    calibration = [torch.randn(16, *x.shape[1:]) for _ in range(3)]
    result = gm.merge([small, large], calibration, x, heads="average", progress=False)
    heads = [s for s in result.spaces if s["widths"] == [HEADS, 6]]
    assert len(heads) == 2 and all(s["width"] == 6 for s in heads)
    fewer = gm.merge([small, large], calibration, x, heads="average", progress=False,
                     width={s["space"]: 5 for s in heads})
    with torch.no_grad():
        for res in (result, fewer):
            out = res.module(calibration[0])
            assert out.shape == small(calibration[0]).shape and torch.isfinite(out).all()


def test_a_product_that_is_not_heads_keeps_the_identity():
    """One projection reshaped into two transformable axes: nothing in the graph says which
    are heads, so both keep the identity, with the reason."""
    class Grid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(4, 5)

        def forward(self, x):
            return self.b(torch.relu(self.a(x).view(-1, 3, 4))).sum(1)

    table = gm.trace(Grid(), torch.randn(2, 6)).space_table
    frozen = [s for s in table if s.frozen and "not attention heads" in s.why]
    assert frozen and not table.heads


def test_match_heads_recovers_a_permutation_of_heads_and_dims():
    """On a correlation matrix of two models whose heads and per-head dims are permuted
    copies, the heads and every head's dims are paired back."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, HEADS * HEAD_DIM, generator=g, dtype=torch.float64)
    heads = torch.randperm(HEADS, generator=g)
    perm = torch.cat([heads[h] * HEAD_DIM + torch.randperm(HEAD_DIM, generator=g)
                      for h in range(HEADS)])
    both = torch.cat([x, x[:, perm]], 1)
    corr = torch.corrcoef(both.T).numpy()
    hm = match_heads([corr], [HEADS, HEADS], [HEAD_DIM], get_matcher("permute"))
    merged = hm.merge[0][0] @ x.numpy().T + hm.merge[0][1] @ x[:, perm].numpy().T
    assert merged.shape == (HEADS * HEAD_DIM, 500)
    assert abs(merged - x.numpy().T).max() < 1e-9


class _FusedBlock(nn.Module):
    """Attention written another way: one fused qkv Linear split with chunk, heads by reshape
    and permute, F.scaled_dot_product_attention, a functional output weight; pre-norm."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.w_out = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
                   for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + torch.nn.functional.linear(y.permute(0, 2, 1, 3).reshape(b, t, d), self.w_out)
        return x + self.ff(x)


class _FusedNet(nn.Module):
    def __init__(self, heads: int = 3, blocks: int = 2) -> None:
        super().__init__()
        d = heads * HEAD_DIM
        self.emb = nn.Embedding(40, d)
        self.blocks = nn.ModuleList(_FusedBlock(d, heads) for _ in range(blocks))
        self.out = nn.Linear(d, 5)

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.out(x.mean(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_attention_written_another_way(frontend):
    """Heads are found (per-head oracle included), a permuted copy merges back, deepening is
    exact; 3 heads × 2 blocks merge with 4 heads × 3 blocks on the exported graph. Under fx the
    head dim is computed in Python (d // self.heads with the attribute baked in), so changing
    the head count there is refused clearly."""
    torch.manual_seed(0)
    model, x = _FusedNet().eval(), torch.randint(0, 40, (2, 6))  # batch 2
    calibration = [torch.randint(0, 40, (2, 6)) for _ in range(4)]
    table = gm.trace(model, x, frontend=frontend).space_table
    assert len(table.heads) == 2 and all(len(ks) == 4 for ks in table.heads.values())
    assert gm.check_spaces(model, x, frontend=frontend).max_output_error < 1e-10
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    result = gm.merge([model, twin], calibration, x, norms="none", frontend=frontend,
                      progress=False)
    assert output_error(model, result.module, (calibration[0],)) < 1e-4
    deep = gm.deepen(model, x, _FusedNet(blocks=4).eval(), frontend=frontend)
    assert output_error(model, deep, (calibration[0],)) < 1e-5
    larger = _FusedNet(heads=4, blocks=3).eval()
    if frontend == "fx":
        with pytest.raises(gm.GraphmergeError, match="d // heads"):
            gm.merge([model, larger], calibration, x, frontend=frontend, progress=False)
        return
    result = gm.merge([model, larger], calibration, x, frontend=frontend, progress=False)
    assert sum(s["widths"] == [3, 4] for s in result.spaces) == 2
    with torch.no_grad():
        out = result.module(calibration[0])
    assert out.shape == (2, 5) and torch.isfinite(out).all()


class _RotaryGQA(nn.Module):
    """Grouped-query attention written by hand: `kv` key/value heads each shared by `group`
    query heads (repeated with repeat_interleave), rotary embeddings by rotate-half on queries
    and keys, a functional softmax attention."""

    def __init__(self, kv: int, group: int = 2, dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.kv, self.group, self.dim = kv, group, dim
        hidden = kv * group * dim
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, kv * dim)
        self.v = nn.Linear(hidden, kv * dim)
        self.o = nn.Linear(hidden, hidden)
        self.register_buffer("freq", 1.0 / 100 ** (torch.arange(0, dim, 2).float() / dim))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.arange(x.shape[2], dtype=x.dtype)[:, None] * self.freq
        angles = torch.cat([angles, angles], dim=-1)
        half = x.shape[-1] // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * angles.cos() + turned * angles.sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.kv * self.group, self.dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.dim).transpose(1, 2)
        q, k = self.rotate(q), self.rotate(k)
        k = k.repeat_interleave(self.group, dim=1)
        v = v.repeat_interleave(self.group, dim=1)
        att = torch.softmax(q @ k.transpose(-2, -1) / self.dim ** 0.5, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, -1)
        return x + self.o(y)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_query_attention_with_rotary_embeddings(frontend):
    """Key/value heads are the heads (each carries its group of queries); rotary query/key dims
    keep their order inside each head, the value/output dims do not; the oracle permutes
    heads, a self-merge is exact, and 2 ⊕ 3 key/value heads merge."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), _RotaryGQA(kv=2), nn.Linear(32, 5)).eval()
    x = torch.randn(2, 6, 12)
    table = gm.trace(model, x, frontend=frontend).space_table
    (h, members), = table.heads.items()
    assert table[h].width == 2 and len(members) == 4
    assert sorted(table.head_groups.values()) == [2, 2]        # queries, output projection
    assert sorted(table[d].frozen for _, d in members) == [False, False, True, True]
    gm.check_spaces(model, x, frontend=frontend)
    calibration = [torch.randn(8, 6, 12, generator=torch.Generator().manual_seed(k))
                   for k in range(3)]
    twin = gm.permute(model, x, seed=2, frontend=frontend)
    v = [dict(m.named_parameters())["1.v.bias"] for m in (model, twin)]
    assert not torch.equal(*v) and torch.equal(*(w.sort().values for w in v))  # units moved
    result = gm.merge([model, twin], calibration, x, frontend=frontend, progress=False)
    assert output_error(model, result.module, (calibration[0],)) < 1e-4
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(12, 48), _RotaryGQA(kv=3), nn.Linear(48, 5)).eval()
    result = gm.merge([model, other], calibration, x, frontend=frontend, progress=False)
    assert any(s["widths"] == [2, 3] for s in result.spaces)
    out = result.module(calibration[0])
    assert out.shape == (8, 6, 5) and torch.isfinite(out).all()


def test_frozen_attention_keeps_heads_in_place():
    """attention="frozen": heads and head dims keep the identity. A twin whose heads are
    permuted no longer merges back; a twin permuted everywhere but in the attention does, and
    no plan is made for a heads space or a projection."""
    model, x = _vit()
    calibration = [torch.randn(16, *x.shape[1:]) for _ in range(3)]
    twin = _per_head_permuted(model, seed=3)
    options = dict(heads="average", norms="none", progress=False, attention="frozen")
    result = gm.merge([model, twin], calibration, x, **options)
    table = gm.trace(model, x).space_table
    projections = {sid for h, ks in table.heads.items() for k, d in ks for sid in (h, k, d)}
    assert not projections & set(result.plans)
    assert output_error(model, result.module, (calibration[0],)) > 1e-3
    same = gm.merge([model, model], calibration, x, **options)
    assert output_error(model, same.module, (calibration[0],)) < 1e-5
    with pytest.raises(gm.ConfigError, match="unknown attention 'head'; valid: heads, frozen"):
        gm.merge([model, twin], calibration, x, attention="head", progress=False)


# ---- elastic attention: heads of different widths ------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("grow", [{"head_dim": 4}, {"heads": 2}, {"heads": 1, "head_dim": 3}])
def test_a_model_merged_with_its_copy_of_wider_heads_is_given_back(grow):
    """widen() adds zero heads / zero head dims (the function is kept); merged with the model,
    either first, the merged attention has the wider heads and computes the model's function
    (model 0's scale stays a literal; zero query/key dims do not change q·kᵀ)."""
    from graphmerge.surgery.widen import widen
    torch.manual_seed(0)
    model = build("vit", dim=32, depth=1, heads=4, mlp_dim=40).eval()
    calibration = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    wide = widen(model, calibration[0], extra=0, seed=3, **grow)
    q = dict(wide.named_parameters())["blocks.0.attn.q.weight"]
    assert q.shape[0] == (4 + grow.get("heads", 0)) * (8 + grow.get("head_dim", 0))
    for pair in ([model, wide], [wide, model]):
        result = gm.merge(pair, calibration, heads="average", norms="none", progress=False)
        assert all(s["width"] == max(s["widths"]) for s in result.spaces)
        with torch.no_grad():
            assert _rel(result.module(calibration[1]), model(calibration[1])) < 1e-5


class _SDPA(nn.Module):
    """Fused q, k, v split and viewed heads × head dim, SDPA with its default scale."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.heads, self.dim, width = heads, dim, heads * dim
        self.inp, self.qkv = nn.Linear(12, width), nn.Linear(width, 3 * width)
        self.o, self.out = nn.Linear(width, width), nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        y = self.inp(x)
        q, k, v = (z.view(b, t, self.heads, self.dim).transpose(1, 2)
                   for z in self.qkv(y).split(self.heads * self.dim, -1))
        z = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y + self.o(z.transpose(1, 2).reshape(b, t, self.heads * self.dim)))


def test_the_default_attention_scale_is_pinned_when_the_head_dim_grows():
    """SDPA's default scale is 1/√E of the runtime head dim: a merged (or widened) graph
    whose head dim changes carries model 0's scale explicitly, so the self-merge with a copy
    of wider heads is exact; two models of head dims 8 and 12 merge to 12 (scale 1/√8)."""
    from graphmerge.surgery.widen import widen
    torch.manual_seed(0)
    model = _SDPA(2, 8).eval()
    calibration = [torch.randn(8, 6, 12) for _ in range(2)]
    wide = widen(model, calibration[0], extra=0, head_dim=4)
    scales = [n.kwargs.get("scale") for n in wide.graph.nodes if "scaled_dot" in str(n.target)]
    assert scales == [pytest.approx(8 ** -0.5)]
    result = gm.merge([model, wide], calibration, norms="none", progress=False)
    with torch.no_grad():
        assert _rel(result.module(calibration[1]), model(calibration[1])) < 1e-5
    torch.manual_seed(1)
    other = _SDPA(2, 12).eval()
    result = gm.merge([model, other], calibration, progress=False)
    scales = [n.kwargs.get("scale") for n in result.module.graph.nodes
              if "scaled_dot" in str(n.target)]
    assert scales == [pytest.approx(8 ** -0.5)]
    with torch.no_grad():
        out = result.module(calibration[1])
        assert torch.isfinite(out).all()
        assert min(_rel(out, m(calibration[1])) for m in (model, other)) > 1e-2


@pytest.mark.parametrize("dims", [(64, 4, 96, 4), (64, 4, 96, 6)])
def test_vits_of_different_head_dims_or_counts_merge(dims):
    """zoo vit 64/4 ⊕ 96/4 (head dims 16 and 24) and 64/4 ⊕ 96/6: the merged attention has the
    widest head dim and the larger head count, runs, is finite and differs from both."""
    torch.manual_seed(0)
    a = build("vit", dim=dims[0], depth=1, heads=dims[1], mlp_dim=64).eval()
    b = build("vit", dim=dims[2], depth=1, heads=dims[3], mlp_dim=64).eval()
    calibration = [torch.randn(32, 1, 28, 28) for _ in range(2)]
    result = gm.merge([a, b], calibration, heads="average", progress=False)
    q = dict(result.module.named_parameters())["blocks.0.attn.q.weight"]
    assert q.shape == (96, 96)
    with torch.no_grad():
        out = result.module(calibration[1])
        assert torch.isfinite(out).all()
        assert min(_rel(out, m(calibration[1])) for m in (a, b)) > 1e-2


def test_gpts_of_different_head_dims_merge_on_the_exported_graph():
    """zoo gpt n_embd 32 ⊕ 48, 4 heads (head dims 8 and 12), exported: the scale
    1/√k.size(-1) is a constant there (model 0's), so a copy with 4 more (zero) dims per head
    merges back exactly, and the independent pair is finite and differs from both."""
    from graphmerge.surgery.widen import widen
    torch.manual_seed(0)
    a, b = build("gpt", n_embd=32, n_head=4).eval(), build("gpt", n_embd=48, n_head=4).eval()
    tokens = [torch.randint(0, 50, (8, 16)) for _ in range(2)]
    first = (lambda o: o[0] if isinstance(o, tuple) else o)
    wide = widen(a, tokens[0], extra=0, head_dim=4)
    result = gm.merge([a, wide], tokens, frontend="export", norms="none", progress=False)
    with torch.no_grad():
        assert _rel(first(result.module(tokens[1])), first(a(tokens[1]))) < 1e-5
    result = gm.merge([a, b], tokens, heads="average", frontend="export", progress=False)
    assert any(s["widths"] == [32, 48] for s in result.spaces)
    with torch.no_grad():
        out = first(result.module(tokens[1]))
        assert torch.isfinite(out).all()
        assert min(_rel(out, first(m(tokens[1]))) for m in (a, b)) > 1e-2


def test_rotary_heads_of_different_head_dims_are_refused_in_one_line():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 32), _RotaryGQA(kv=2), nn.Linear(32, 5)).eval()
    b = nn.Sequential(nn.Linear(12, 48), _RotaryGQA(kv=2, dim=12), nn.Linear(48, 5)).eval()
    calibration = [torch.randn(8, 6, 12) for _ in range(2)]
    with pytest.raises(gm.MismatchError, match="rotary position encoding") as info:
        gm.merge([a, b], calibration, progress=False)
    assert "\n" not in str(info.value)


def test_elastic_head_dims_merge_and_unmerge_to_the_identity():
    """match_heads on heads of dims 2 and 3: Σ_i M_i U_i = I on the merged axis (every merged
    dim averages what is paired with it, a dim only model 1 has is model 1's alone)."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((200, 2 * 2 + 2 * 3))
    corr = np.corrcoef(feats.T)
    for name in ("zip", "permute"):
        hm = match_heads([corr], [2, 2], [[2, 3]], get_matcher(name))
        assert hm.widths == [3] and hm.merge[0][0].shape == (6, 4)
        total = sum(m @ u for m, u in zip(hm.merge[0], hm.unmerge[0]))
        assert np.allclose(total, np.eye(6))


def test_groups_of_two_widths_merge():
    """Groups are heads of the channel space: GroupNorm nets of 4 groups of 4 and of 6
    channels, ResNeXt nets of 4 groups of 4 and of 8 units (a grouped convolution's input
    units: one pairing for every group) merge to the wider groups, the modules' group counts
    following the merged groups (not the units per group)."""
    from graphmerge.lab.zoo.grouped import resnext
    from graphmerge.lab.zoo.normfree import gncnn
    torch.manual_seed(0)
    calibration = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    for a, b in ((gncnn(width=16, groups=4), gncnn(width=24, groups=4)),
                 (resnext(width=1), resnext(width=2))):
        result = gm.merge([a.eval(), b.eval()], calibration, progress=False)
        grouped = [m for m in result.module.modules()
                   if getattr(m, "num_groups", getattr(m, "groups", 1)) > 1]
        assert grouped and all(getattr(m, "num_groups", getattr(m, "groups", 1)) == 4
                               for m in grouped)
        with torch.no_grad():
            out = result.module(calibration[1])
            assert torch.isfinite(out).all()
            assert min(_rel(out, m(calibration[1])) for m in (a, b)) > 1e-2


@pytest.mark.parametrize("grow", [{"heads": 1}, {"head_dim": 2}])
def test_a_resnext_merged_with_its_copy_of_wider_groups_is_given_back(grow):
    from graphmerge.lab.zoo.grouped import resnext
    from graphmerge.passes import reset_batch_norms
    from graphmerge.surgery.widen import widen
    torch.manual_seed(0)
    calibration = [torch.randn(32, 3, 32, 32) for _ in range(2)]
    model = resnext(width=1)
    reset_batch_norms(model, [(calibration[0],)], progress=False)
    model.eval()
    wide = widen(model, calibration[0], extra=0, **grow)
    assert sum(p.numel() for p in wide.parameters()) > sum(p.numel() for p in model.parameters())
    result = gm.merge([wide, model], calibration, norms="none", progress=False)
    with torch.no_grad():
        assert _rel(result.module(calibration[1]), model(calibration[1])) < 1e-5


class _GQA(_RotaryGQA):
    """Grouped-query attention without rotary embeddings."""

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _gqa(group: int) -> nn.Module:
    width = 2 * group * HEAD_DIM
    return nn.Sequential(nn.Linear(12, width), _GQA(kv=2, group=group), nn.Linear(width, 5))


def _with_a_zero_query_per_group(model: nn.Module) -> nn.Module:
    """A copy of a group-2 `_gqa` with groups of 3: the third query of every group is zero
    (uniform attention, read by zero output columns) and the extra residual units are zero,
    so it computes the same function."""
    big = _gqa(3)
    a, b = model[1], big[1]
    with torch.no_grad():
        for p in big.parameters():
            p.zero_()
        big[0].weight[:32], big[0].bias[:32] = model[0].weight, model[0].bias
        big[2].weight[:, :32], big[2].bias[:] = model[2].weight, model[2].bias
        for name in ("k", "v"):
            getattr(b, name).weight[:, :32] = getattr(a, name).weight
            getattr(b, name).bias[:] = getattr(a, name).bias
        b.q.weight.view(2, 3, HEAD_DIM, 48)[:, :2, :, :32] = a.q.weight.view(2, 2, HEAD_DIM, 32)
        b.q.bias.view(2, 3, HEAD_DIM)[:, :2] = a.q.bias.view(2, 2, HEAD_DIM)
        b.o.weight.view(48, 2, 3, HEAD_DIM)[:32, :, :2] = a.o.weight.view(32, 2, 2, HEAD_DIM)
        b.o.bias[:32] = a.o.bias
    return big.eval()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_grouped_query_attention_of_different_group_sizes(frontend):
    """Groups of 2 and 3 queries per key/value head merge to groups of 3 (query j of a group
    is merged query j; the repeat count and the view sizes follow): with a copy whose third
    query is zero the merge gives the model back, with an independent model it is finite and
    differs from both."""
    torch.manual_seed(0)
    model, other = _gqa(2).eval(), _gqa(3).eval()
    twin = _with_a_zero_query_per_group(model)
    calibration = [torch.randn(16, 6, 12) for _ in range(2)]
    x = torch.randn(2, 6, 12)
    assert output_error(model, twin, (calibration[1],)) < 1e-6
    for pair in ([model, twin], [twin, model]):
        result = gm.merge(pair, calibration, x, frontend=frontend, norms="none",
                          progress=False)
        with torch.no_grad():
            assert _rel(result.module(calibration[1]), model(calibration[1])) < 1e-5
    result = gm.merge([model, other], calibration, x, frontend=frontend, progress=False)
    with torch.no_grad():
        out = result.module(calibration[1])
        assert torch.isfinite(out).all()
        assert min(_rel(out, m(calibration[1])) for m in (model, other)) > 1e-2


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hugging_face_heads_of_different_widths(name, monkeypatch):
    """Hugging Face BERT / GPT-2 (exported, SDPA with the model's scale): a copy with a head
    and 4 head dims more merges back exactly; hidden 32 ⊕ 48 at 4 heads (head dims 8 and 12)
    merges, finite."""
    pytest.importorskip("transformers")
    import hf_models  # tests/hf_models.py
    from graphmerge.surgery.widen import widen
    model, x = getattr(hf_models, name)(seed=0)
    wide = widen(model, x, extra=0, heads=1, head_dim=4)
    result = gm.merge([model, wide], [x, x], x, norms="none", progress=False)
    with torch.no_grad():
        assert _rel(result.module(*x), model(*x)) < 1e-5
    monkeypatch.setattr(hf_models, "HEAD_DIM", 12)
    other, _ = getattr(hf_models, name)(seed=1)
    result = gm.merge([model, other], [x, x], x, progress=False)
    with torch.no_grad():
        assert torch.isfinite(result.module(*x)).all()

"""Orthogonal alignment of rotation-free spaces (merge option rotate=True): which spaces the
graph lets rotate, the fold and the rotation as an exact reparametrisation, exact permuted
self-merges, and a pair that differs by a rotation of its stream merged back into one model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graph.rotatable import rotatable_spaces
from graphmerge.match.rotation import RANK_RTOL, ones_complement, procrustes
from graphmerge.match.selection import mergeable
from graphmerge.surgery.fold import fold_norms
from graphmerge.surgery.rotate import rotate_space

D, T = 12, 5


class Block(nn.Module):
    def __init__(self, norm: type, post: bool = False) -> None:
        super().__init__()
        self.n1, self.n2, self.post = norm(D), norm(D), post
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = (f(x).view(b, T, 2, D // 2).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, T, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post:  # post-norm: the norm's output is the stream
            x = self.n1(x + self.attn(x))
            return self.n2(x + self.fc2(F.gelu(self.fc1(x))))
        x = x + self.attn(self.n1(x))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Tiny(nn.Module):
    """A pre-norm (or post-norm) transformer on [B, T, 6] token features."""

    def __init__(self, norm: type = nn.LayerNorm, post: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.5)
        self.blocks = nn.Sequential(Block(norm, post), Block(norm, post))
        self.norm = norm(D)
        self.head = nn.Linear(D, 3, bias=False)  # the final norm's bias stays on it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x) + self.pos))[:, 0])


def _model(norm: type = nn.LayerNorm, post: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Tiny(norm, post).eval()
    with torch.no_grad():  # affines far from 1 and 0, so that folding them matters
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.uniform_(0.5, 1.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.normal_(0, 0.3)
    return m


def _stream(traced) -> int:
    table = traced.space_table
    return next(s.id for s in table if any(p.param == "embed.weight" and p.role == "out"
                                           for p in s.params))


def _rotated(model: nn.Module, x: torch.Tensor, frontend: str, seed: int = 1):
    """A copy of `model` with its norms folded and its stream rotated by a random orthogonal
    Q (keeping the ones direction when a LayerNorm asks); the copy and the verdict."""
    twin = copy.deepcopy(model)
    t = gm.trace(twin, x, frontend=frontend)  # shares the copy's tensors
    sid = _stream(t)
    r = rotatable_spaces(t, t.space_table, [s.id for s in mergeable(t.space_table)])[sid]
    assert r.ok, r.reason
    identity = fold_norms(t.graph_module, list(r.norms))
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    if r.ones:
        p = ones_complement(D)
        q = p @ torch.linalg.qr(torch.randn(D - 1, D - 1, generator=g,
                                            dtype=torch.float64))[0] @ p.T + 1.0 / D
    rotate_space(t.graph_module, t.space_table, sid, q, skip=identity)
    return twin, r


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_fold_and_rotation_are_exact(frontend, norm):
    m, x = _model(norm), torch.randn(16, T, 6)
    twin, r = _rotated(m, x, frontend)
    assert r.ones == (norm is nn.LayerNorm) and len(r.norms) == 5
    moved = max(float((a - b).abs().max()) for a, b in zip(m.state_dict().values(),
                                                           twin.state_dict().values()))
    assert moved > 0.1
    torch.testing.assert_close(twin(x), m(x), atol=2e-5, rtol=0)


@pytest.mark.parametrize("n, method", [(2, "zip"), (3, "permute")])
def test_permuted_self_merge_stays_exact_with_rotation(n, method):
    m, x = _model(), torch.randn(96, T, 6)
    twins = [gm.permute(m, x[:8], seed=s) for s in range(3, 2 + n)]
    res = gm.merge([m, *twins], [x[:48], x[48:]], rotate=True, method=method, progress=False)
    sid = _stream(gm.trace(m, x[:8]))
    assert res.rotations[sid].ok and res.rotations[sid].ones
    assert f"rotated spaces: {sid} (Q·1 = 1)" in res.summary
    assert "gelu" in res.summary  # the MLP hidden spaces are not rotated, with their reason
    torch.testing.assert_close(res.module(x), m(x), atol=1e-4, rtol=0)


def test_post_norm_is_not_rotated():
    m, x = _model(post=True), torch.randn(64, T, 6)
    b = gm.permute(m, x[:8], seed=3)
    res = gm.merge([m, b], [x], rotate=True, progress=False)
    assert not any(r.ok for r in res.rotations.values())
    assert "cannot be folded" in res.summary and "(add)" in res.summary
    torch.testing.assert_close(res.module(x), m(x), atol=1e-4, rtol=0)


def test_rotation_recovers_a_rotated_stream():
    """B is A with its stream rotated: rotation undoes it and the merge gives A back; a
    permutation alone cannot."""
    m, x = _model(), torch.randn(96, T, 6)
    twin, _ = _rotated(m, x[:8], "fx")
    cal = [x[:48], x[48:]]
    on = gm.merge([m, twin], cal, rotate=True, method="permute", progress=False)
    off = gm.merge([m, twin], cal, method="permute", progress=False)
    ref = m(x)
    err_on = float((on.module(x) - ref).abs().max())
    err_off = float((off.module(x) - ref).abs().max())
    assert err_on < 1e-3 < err_off, (err_on, err_off)


@pytest.mark.parametrize("ones", [False, True])
def test_procrustes_finds_a_permutation_and_refuses_rank_deficient_moments(ones):
    """On x_k = x_0 P the solution is Pᵀ (with or without Q·1 = 1); on features of rank 5 of
    8 it is not unique and refused."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200, 8, generator=g, dtype=torch.float64)
    p = torch.eye(8, dtype=torch.float64)[torch.randperm(8, generator=g)]
    q, ratio = procrustes((x0 @ p).T @ x0, ones)
    assert ratio > RANK_RTOL
    torch.testing.assert_close(q, p.T, atol=1e-10, rtol=0)
    low = torch.randn(200, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 8, generator=g, dtype=torch.float64)
    q, ratio = procrustes((low @ p).T @ low, ones)
    assert q is None and ratio < RANK_RTOL


def test_rotation_on_another_device_matches_the_cpu_merge():
    """rotate=True on the emulated second device of test_device.py: every tensor the fold,
    the Procrustes solve and the rotated statistics make stays there."""
    from test_device import ONE, SECOND, X, _rel, _vit, devices, moved, on_second_device

    torch.manual_seed(0)
    model = _vit()
    twin = gm.permute(model, X[:4], seed=3)
    on_cpu = gm.merge([model, twin], ONE, rotate=True, progress=False)
    with on_second_device():
        result = gm.merge([moved(model), moved(twin)], [x.to(SECOND) for x in ONE],
                          rotate=True, progress=False)
        with torch.no_grad():
            y = result.module(X[:16].to(SECOND)).cpu()
    assert devices(result.module) == {str(SECOND)}
    assert any(r.ok for r in result.rotations.values())
    with torch.no_grad():
        assert _rel(on_cpu.module(X[:16]), y) < 1e-5

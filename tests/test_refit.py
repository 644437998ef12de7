"""Merge option refit=True: every linear layer and convolution of the merged module refitted by
least squares on the calibration data. A permuted self-merge and a merge with a widened copy
stay exact (fx and export, zip and permute, partial, concatenated heads, every zoo family,
transformers models); two independent models' merge comes closer to its targets on held-out
data; a conv before a batch norm is aimed at the norm's output; tied weights are left alone; a
layer with fewer samples than inputs keeps its merged weight; a refit that would exceed
max_memory is skipped and said; the result exports to ONNX."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import graphmerge as gm
from graphmerge.graph.analyse import trace
from graphmerge.lab.zoo import registry
from graphmerge.surgery.refit import refit_points

D, T = 12, 5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(self.n1(x)).view(b, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, T, D)
        x = x + self.o(a)
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class Tiny(nn.Module):
    """A pre-norm transformer on [B, T, 6] token features (fused qkv, a bias-free linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, D)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x)))[:, 0])


class Tied(nn.Module):
    """A token model whose output layer reads the embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.out = nn.Linear(D, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.out(h + self.fc2(F.relu(self.fc1(h))))


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().eval()


def _data(seed: int = 0, n: int = 96) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, 6, generator=g)
    return [x[i:i + 32] for i in range(0, n, 32)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("method", ["zip", "permute"])
def test_a_permuted_self_merge_stays_exact(frontend: str, method: str) -> None:
    m = _tiny(0)
    cal = _data()
    twin = gm.permute(m, cal[0], seed=3)
    before = copy.deepcopy(twin.state_dict())
    res = gm.merge([m, twin], cal, method=method, refit=True, frontend=frontend,
                   progress=False)
    assert res.refit is not None and not res.refit.skipped
    assert res.refit.layers == 10  # embed, 2 × (qkv, o, fc1, fc2), head
    assert res.refit.error_before < 1e-10 and res.refit.error_after <= res.refit.error_before
    x = _data(seed=1)[0]
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-5
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items())
    assert "refit: 10 layers" in res.summary


def test_a_widened_copy_merges_back() -> None:
    m = _tiny(0)
    cal = _data()
    wide = gm.widen(m, cal[0], extra=0.5, seed=2)
    res = gm.merge([m, wide], cal, refit=True, progress=False)
    assert res.refit.layers > 0
    x = _data(seed=1)[0]
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-4


@pytest.mark.parametrize("options", [{"partial": 0.5}, {"heads": "concat"}])
def test_partial_and_concatenated_heads_stay_exact(options: dict) -> None:
    m = _tiny(0)
    cal = _data()
    twin = gm.permute(m, cal[0], seed=4)
    res = gm.merge([m, twin], cal, refit=True, progress=False, **options)
    assert res.refit.layers > 0 and res.refit.error_before < 1e-10
    x = _data(seed=1)[0]
    with torch.no_grad():
        out, ref = res.module(x), m(x)
    if options.get("heads") == "concat":  # both models' heads, side by side
        ref = torch.cat([ref, twin(x)], -1)
    assert _rel(out, ref) < 1e-5


def test_two_independent_models_come_closer_to_their_targets() -> None:
    """On held-out inputs the refitted merge is nearer the parents' mean output (the head's
    target: its output space is not merged) than the plain merge, and every layer's
    calibration error went down."""
    a, b = _tiny(0), _tiny(1)
    cal, held = _data(seed=0, n=256), _data(seed=5)[0]
    plain = gm.merge([a, b], cal, progress=False)
    fitted = gm.merge([a, b], cal, refit=True, progress=False)
    with torch.no_grad():
        target = (a(held) + b(held)) / 2
        err_plain = float((plain.module(held) - target).norm() / target.norm())
        err_fit = float((fitted.module(held) - target).norm() / target.norm())
    assert err_fit < 0.7 * err_plain
    assert all(after < before for before, after in fitted.refit.errors.values())
    assert fitted.refit.error_after < fitted.refit.error_before


def test_tied_weights_are_not_refitted() -> None:
    torch.manual_seed(0)
    m = Tied().eval()
    ids = torch.randint(0, 20, (64, 7), generator=torch.Generator().manual_seed(0))
    points = refit_points(trace(m, ids[:8]))
    assert sorted(p.weight for p in points) == ["fc1.weight", "fc2.weight"]
    twin = gm.permute(m, ids[:8], seed=1)
    res = gm.merge([m, twin], [ids[:32], ids[32:]], refit=True, progress=False)
    assert res.refit.layers == 2
    with torch.no_grad():
        assert _rel(res.module(ids), m(ids)) < 1e-5


def test_a_refit_past_max_memory_is_skipped_and_said() -> None:
    m = _tiny(0)
    cal = _data()
    twin = gm.permute(m, cal[0], seed=3)
    res = gm.merge([m, twin], cal, refit=True, max_memory=20_000, progress=False)
    assert res.refit.layers == 0 and "max_memory" in res.refit.skipped
    assert "refit: skipped" in res.summary
    x = _data(seed=1)[0]
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-5  # the merge itself is unchanged


def test_refit_must_be_a_bool() -> None:
    with pytest.raises(gm.ConfigError, match="refit must be True or False"):
        gm.merge([_tiny(0), _tiny(1)], _data(), refit="yes")


def test_without_refit_the_summary_does_not_mention_it() -> None:
    res = gm.merge([_tiny(0), _tiny(1)], _data(), progress=False)
    assert res.refit is not None and res.refit.layers == 0
    assert "refit" not in res.summary


@settings(max_examples=8, deadline=None)
@given(widths=st.lists(st.integers(2, 9), min_size=1, max_size=3), seed=st.integers(0, 99),
       bias=st.booleans())
def test_any_permuted_mlp_merges_back_exactly(widths: list[int], seed: int,
                                              bias: bool) -> None:
    torch.manual_seed(seed)
    sizes = [5, *widths, 3]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(d_in, d_out, bias=bias)] + ([nn.Tanh()] if i < len(widths) else [])
    m = nn.Sequential(*layers).eval()
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(seed))
    twin = gm.permute(m, x, seed=seed + 1)
    res = gm.merge([m, twin], [x[:20], x[20:]], refit=True, progress=False)
    assert res.refit.layers == len(sizes) - 1
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-4


def test_few_calibration_samples_per_input_are_warned() -> None:
    a, b = _tiny(0), _tiny(1)
    few = [_data(n=8)[0]]  # 8 sequences of 5 tokens: 40 samples for up to 25 inputs
    with pytest.warns(gm.FewSamplesWarning, match=r"refit: \d+ of 9 layers saw fewer than 4 "
                                                  r"calibration samples per input"):
        res = gm.merge([a, b], few, refit=True, progress=False)
    assert res.refit.few and all(s < 4 * i for _, i, s in res.refit.few)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_transformers_models_refit_and_merge_back(name: str) -> None:
    """GPT-2's Conv1D layers (addmm, weight [in, out]) are refitted, its LM head tied to the
    embedding is not; BERT's linears are; permuted self-merges stay exact."""
    pytest.importorskip("transformers")
    from tests.hf_models import HF_MODELS

    m, x = HF_MODELS[name](0)
    cal = [HF_MODELS[name](0)[1] for _ in range(4)]
    points = refit_points(trace(m, x, frontend="export"))
    assert points and all("wte" not in p.weight and "lm_head" not in p.weight for p in points)
    if name == "gpt2":
        assert {p.out_axis for p in points} == {1}  # every Conv1D: weight [in, out]
    twin = gm.permute(m, x, seed=1)
    res = gm.merge([m, twin], cal, example_inputs=x, refit=True, progress=False)
    assert res.refit.layers > 0 and res.refit.layers + len(res.refit.kept) == len(points)
    with torch.no_grad():
        assert _rel(res.module(*x), m(*x)) < 1e-5


def test_a_layer_whose_inputs_are_all_zero_keeps_its_merged_weight() -> None:
    """A layer behind a dead ReLU sees only zeros: nothing to fit (no singular solve)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                      nn.Linear(5, 2)).eval()
    with torch.no_grad():
        m[2].weight.zero_()
        m[2].bias.fill_(-1.0)  # the second ReLU's output is 0 everywhere
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    twin = gm.permute(m, x, seed=2)
    res = gm.merge([m, twin], [x[:32], x[32:]], method="permute", refit=True, progress=False)
    assert sorted(res.refit.errors) == ["_0", "_2"]  # the last linear, behind zeros, is not
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-5


def test_a_weight_normed_model_merges_back() -> None:
    """A parametrized weight (weight norm) is captured as the weight it computes: refitted in
    the merged module like any other, and the caller's parametrization is untouched."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    m = nn.Sequential(weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 2)).eval()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    twin = gm.permute(m, x, seed=2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = gm.merge([m, twin], [x[:32], x[32:]], refit=True, progress=False)
    assert res.refit.layers == 2
    with torch.no_grad():
        assert _rel(res.module(x), m(x)) < 1e-5
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


ZOO = sorted({*registry.FAMILIES, *registry.COMMUNITY})


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_family_merges_back_exactly_with_refit(name: str) -> None:
    """Convolutions (grouped, depthwise, 1-D, functional, reflect-padded, before a batch norm)
    and linears of every zoo family refitted in a permuted self-merge: still exact."""
    torch.manual_seed(0)
    model = registry.build(name).eval()
    batches = [registry.example_input(name, 12) for _ in range(2)]
    twin = gm.permute(model, batches[0], seed=3)
    res = gm.merge([model, twin], batches, refit=True, progress=False)
    # a layer with fewer samples than inputs (an MLP on 784 pixels) keeps its merged weight
    points = refit_points(trace(model, batches[0][:4]))
    assert res.refit.layers + len(res.refit.kept) == len(points) > 0
    assert not res.refit.layers or res.refit.error_before < 1e-8
    probe = registry.example_input(name, 6)
    with torch.no_grad():
        assert _rel(res.module(probe), model(probe)) < 1e-4


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


def test_a_convolution_before_a_batch_norm_is_fitted_to_the_norms_output() -> None:
    """A copy whose convolutions are scaled by 2 and whose batch norms' statistics follow
    (the same function) merges back: the refit aims each conv → BN pair at the models' batch
    norm outputs through the merged norm's statistics, not at the convolutions' outputs."""
    torch.manual_seed(0)
    m = ConvBN().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        for conv, bn in ((twin.conv1, twin.bn1), (twin.conv2, twin.bn2)):
            conv.weight *= 2
            conv.bias *= 2
            bn.running_mean *= 2
            bn.running_var.mul_(4).add_(3 * bn.eps)  # (2σ)² + eps over (σ² + eps)·4: same
    g = torch.Generator().manual_seed(0)
    cal = [torch.randn(32, 3, 8, 8, generator=g) for _ in range(3)]
    x = torch.randn(16, 3, 8, 8, generator=g)
    with torch.no_grad():
        assert _rel(twin(x), m(x)) < 1e-5
        plain = gm.merge([m, twin], cal, progress=False).module(x)
        res = gm.merge([m, twin], cal, refit=True, progress=False)
        fitted = res.module(x)
    assert res.refit.layers == 3
    assert _rel(fitted, m(x)) < 5e-5 < _rel(plain, m(x))  # aimed at the convs alone: 5e-4


def test_a_layer_with_fewer_samples_than_inputs_keeps_its_merged_weight() -> None:
    """The head reads one pooled sample per sequence: 8 sequences for 13 inputs would only be
    interpolated, so it is kept as merged, said in the summary and warned; the layers that
    read every token are refitted."""
    a, b = _tiny(0), _tiny(1)
    few = [_data(n=8)[0]]  # 8 sequences of 5 tokens
    with pytest.warns(gm.FewSamplesWarning, match=r"refit: 1 layers kept their merged weights"):
        res = gm.merge([a, b], few, refit=True, progress=False)
    plain = gm.merge([a, b], few, progress=False)
    assert res.refit.kept == [("head", D + 1, 8)] and res.refit.layers == 9
    assert torch.equal(res.module.head.weight, plain.module.head.weight)
    assert "1 kept as merged (fewer calibration samples than inputs" in res.summary


def test_a_refitted_merge_exports_to_onnx(tmp_path) -> None:
    torch.manual_seed(0)
    a, b = ConvBN().eval(), ConvBN().eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]
    res = gm.merge([a, b], cal, refit=True, progress=False)
    assert res.refit.layers == 3
    report = gm.export_onnx(res.module, cal[0][:4], tmp_path / "merged.onnx")
    assert report.max_rel_diff < 1e-4

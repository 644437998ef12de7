"""Depth: stages and units, exact identity expansion, alignment, merging across depths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graph.capture import run_nodes
from graphmerge.graph.oracle import output_error
from graphmerge.graph.stages import find_stages
from graphmerge.lab import zoo
from graphmerge.match.align import align
from graphmerge.passes import reset_batch_norms
from graphmerge.surgery.deepen import deepen
from graphmerge.surgery.widen import widen

X = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # not import-order dependent

PAIRS = {
    "resnet": (lambda: zoo.resnet(depths=(1, 1, 1), stem_stride=2),
               lambda: zoo.resnet(depths=(2, 3, 2), stem_stride=2)),
    "mlp": (lambda: zoo.mlp(hidden=(24, 16)), lambda: zoo.mlp(hidden=(24, 24, 24, 16, 16))),
    "vgg": (lambda: zoo.vgg(channels=(8, "M", 12), hidden=16),
            lambda: zoo.vgg(channels=(8, 8, "M", 12, 12, 12), hidden=16)),
    "vit": (lambda: zoo.vit(dim=32, depth=1, heads=4, mlp_dim=40),
            lambda: zoo.vit(dim=32, depth=3, heads=4, mlp_dim=40)),
}


def _trained_like(model: nn.Module) -> nn.Module:
    reset_batch_norms(model, [(X,)], progress=False)
    return model.eval()


def _rel(a, b):
    return float((a - b).norm() / a.norm())


def test_stages_of_the_zoo():
    def depths(model):
        return [s.depth for s in find_stages(gm.trace(model, X[:2]))]

    # a block that changes stride or width is trunk: stages hold the blocks that keep the stream
    assert depths(zoo.resnet(depths=(1, 2, 3))) == [1, 1, 2]
    assert depths(zoo.mlp(hidden=(32, 32, 16))) == [1]
    assert depths(zoo.vgg(channels=(8, 8, "M", 16, 16, 16))) == [1, 2]
    assert depths(zoo.vit(dim=32, depth=3, heads=4, mlp_dim=40)) == [3]  # attention + MLP


def test_stages_are_the_same_on_fx_and_export_graphs():
    for model in (zoo.resnet(depths=(1, 2, 3)), zoo.vit(dim=32, depth=3, heads=4, mlp_dim=40),
                  zoo.mlp(hidden=(32, 32, 16))):
        found = [[(s.anchor, s.depth) for s in find_stages(gm.trace(model, X[:2], frontend=f))]
                 for f in ("fx", "export")]
        assert [[d for _, d in f] for f in found] == [[d for _, d in found[0]]] * 2


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_identity_expansion_is_exact(family):
    shallow_fn, deep_fn = PAIRS[family]
    shallow = _trained_like(shallow_fn())
    deep = deepen(shallow, X[:4], deep_fn().eval())
    assert [s.depth for s in find_stages(gm.trace(deep, X[:2]))] == \
        [s.depth for s in find_stages(gm.trace(deep_fn(), X[:2]))]
    y = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert _rel(shallow(y), deep(y)) < 1e-6


@pytest.mark.parametrize("align", ["lma", "sma", "uniform"])
@pytest.mark.parametrize("family", ["resnet", "mlp", "vgg"])
def test_shallow_merged_with_its_deepened_permuted_copy_recovers_it(family, align):
    shallow_fn, deep_fn = PAIRS[family]
    shallow = _trained_like(shallow_fn())
    deep = gm.permute(deepen(shallow, X[:4], deep_fn().eval()), X[:4], seed=5)
    calib = [X[:16], X[16:]]
    result = gm.merge([shallow, deep], calib, heads="average", align=align, norms="none",
                      progress=False)
    assert any(len(set(a.depths)) > 1 for a in result.alignments)
    y = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert _rel(shallow(y), result.module(y)) < 1e-4


# stages of 2 shallow units in 4 deep ones: the alignment methods can disagree
SHALLOW_2, DEEP_4 = (2, 2, 2), (4, 4, 4)


def test_alignment_methods_differ_and_the_merge_uses_the_chosen_one():
    torch.manual_seed(0)
    shallow = _trained_like(zoo.resnet(depths=SHALLOW_2, stem_stride=2))
    deep = _trained_like(zoo.resnet(depths=DEEP_4, stem_stride=2))
    chosen = {}
    for method in ("lma", "sma", "uniform"):
        result = gm.merge([shallow, deep], [X[:16], X[16:]], heads="average", align=method,
                          norms="none", progress=False)
        for a in result.alignments:
            if a.cka[0] is not None:
                assert a.positions[0] == align(a.cka[0], method)
        chosen[method] = [a.positions[0] for a in result.alignments]
    assert chosen["sma"] != chosen["uniform"]


def test_sma_recovers_a_placement_that_uniform_misses():
    """Units placed off the uniform grid: the CKA alignment finds them, the uniform one does not."""
    shallow = _trained_like(zoo.resnet(depths=SHALLOW_2, stem_stride=2))
    placed = [[0, 2], [0], [0]]  # 2 of 4 units in stage 0; 1 of 3 in the others
    deep = gm.permute(deepen(shallow, X[:4], zoo.resnet(depths=DEEP_4, stem_stride=2).eval(),
                             positions=placed), X[:4], seed=5)
    y = torch.randn(8, 1, 28, 28)
    errors = {}
    for method in ("sma", "uniform"):
        result = gm.merge([shallow, deep], [X[:16], X[16:]], heads="average", align=method,
                          norms="none", progress=False)
        if method == "sma":
            assert [a.positions[0] for a in result.alignments] == placed
        with torch.no_grad():
            errors[method] = _rel(shallow(y), result.module(y))
    assert errors["sma"] < 1e-4 < 1e-2 < errors["uniform"]


def test_depth_and_width_differences_combine():
    shallow_fn, deep_fn = PAIRS["resnet"]
    shallow = _trained_like(shallow_fn())
    deep_wide = widen(deepen(shallow, X[:4], deep_fn().eval()), X[:4], extra=0.5, seed=2)
    result = gm.merge([deep_wide, shallow], [X[:16], X[16:]], heads="average",
                      norms="none", progress=False)
    assert any(len(set(s["widths"])) > 1 for s in result.spaces)
    y = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert _rel(shallow(y), result.module(y)) < 1e-4


def test_three_models_of_different_depths():
    models = [_trained_like(zoo.resnet(depths=d, stem_stride=2))
              for d in ((1, 1, 1), (2, 2, 2), (1, 2, 1))]
    result = gm.merge(models, [X[:16], X[16:]], heads="average", progress=False)
    assert [a.depths for a in result.alignments] == [[1, 2, 1], [0, 1, 1], [0, 1, 0]]
    with torch.no_grad():
        out = result.module(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_models_that_differ_outside_their_stages_are_refused():
    with pytest.raises(gm.MismatchError, match="outside their units of depth"):
        gm.merge([zoo.mlp(hidden=(24,)), zoo.mlp(hidden=(24, 24, 16))], [X], progress=False)


def test_unknown_alignment_lists_the_valid_ones():
    m = zoo.mlp(hidden=(24,))
    with pytest.raises(gm.ConfigError, match="lma"):
        gm.merge([m, m], [X], align="best", progress=False)


def test_calibration_batches_of_two_are_pooled_for_cka():
    shallow_fn, deep_fn = PAIRS["resnet"]
    shallow = _trained_like(shallow_fn())
    deep = gm.permute(deepen(shallow, X[:4], deep_fn().eval()), X[:4], seed=5)
    calib = [X[i:i + 2] for i in range(0, 32, 2)]  # a loader of batch size 2
    result = gm.merge([shallow, deep], calib, heads="average", norms="none", progress=False)
    deeper = [a for a in result.alignments if len(set(a.depths)) > 1 and a.depths[0]]
    assert deeper and all(a.cka[0] is not None for a in deeper)
    y = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert _rel(shallow(y), result.module(y)) < 1e-4


def test_deepen_inserts_dense_layers_that_append_zeros():
    """A dense block concatenates: each unit widens the stream, so a deeper block is depth and
    width at once. An inserted dense layer writes zeros, and every later reader of the stream
    reads them with zero weights: the deepened model computes the same function."""
    model, x = zoo.builtin("densenet", batch=2)
    model = _trained_like(model)
    deeper = zoo.build("densenet", block_layers=(5, 5)).eval()
    deep = deepen(model, x, deeper)
    assert [s.depth for s in find_stages(gm.trace(deep, x))] == [5, 5]
    assert output_error(model, deep, (x,)) < 1e-6
    # the transition reads 16 + 5 × 8 channels, 2 × 8 of them zeros, and keeps its 40 // 2
    transition = deep.get_submodule("features.5.conv").weight
    assert tuple(transition.shape[:2]) == (20, 56)
    assert int((transition.abs().sum((0, 2, 3)) == 0).sum()) == 16


def test_plain_units_need_a_proven_identity_region():
    """A GELU stack has no input on which GELU is the identity: deepening it is refused with
    the activation named; a ReLU stack deepens exactly."""
    def stack(act, n):
        return nn.Sequential(nn.Linear(6, 8), act(), *[m for _ in range(n)
                                                     for m in (nn.Linear(8, 8), act())],
                             nn.Linear(8, 3)).eval()

    x = torch.randn(4, 6)
    with pytest.raises(gm.GraphmergeError, match="gelu"):
        deepen(stack(nn.GELU, 1), x, stack(nn.GELU, 3))
    shallow = stack(nn.ReLU, 1)
    deep = deepen(shallow, x, stack(nn.ReLU, 3))
    assert len([m for m in deep.modules() if isinstance(m, nn.Linear)]) == 5
    assert output_error(shallow, deep, (torch.randn(16, 6),)) < 1e-6


def test_post_norm_units_get_fitted_norms_and_a_warning():
    """x <- LN(x + f(x)): a zero branch still normalises, so the inserted units' norms get the
    affine that best reproduces their input; the error left is reported per norm."""
    from graphmerge.lab.zoo.bert import tiny_bert_classifier

    shallow = tiny_bert_classifier(layers=2, seed=0)
    reference = tiny_bert_classifier(layers=4, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like norms: the stream is far from unit-normalised
        for m in shallow.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))

    def batch(n):
        return torch.randint(1, 100, (n, 12), generator=g), torch.ones(n, 12, dtype=torch.long)

    x, calib = batch(4), [batch(16) for _ in range(4)]
    with pytest.warns(gm.InexactExpansionWarning, match=r"layer\.1\.attention\.output"):
        deep = deepen(shallow, x, reference, calibration=calib)
    assert output_error(shallow, deep, calib[0]) < 1e-2


def test_post_norm_fit_is_the_least_squares_affine():
    """The fitted affine reproduces the norm's input at least as well as any other: the
    default (1, 0) and random ones."""
    from graphmerge.surgery.deepen import fit_post_norms

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8)).eval()
    batches = [(torch.randn(32, 6, generator=g),) for _ in range(3)]
    x = torch.cat([model[0](b[0]) for b in batches]).detach().double()

    def error(weight, bias):
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True)
                                                       + 1e-5)
        return float((z * weight + bias - x).norm() / x.norm())

    default = error(torch.ones(8), torch.zeros(8))
    traced = torch.fx.symbolic_trace(model)
    norm, source = [n.name for n in traced.graph.nodes][2:0:-1]  # the LayerNorm, its input
    fitted = fit_post_norms(traced, [(norm, source)], batches)["1"]
    model = traced
    ln = model.get_submodule("1")
    assert fitted == pytest.approx(error(ln.weight.double(), ln.bias.double()))
    assert fitted < default
    for _ in range(5):
        assert fitted <= error(1 + torch.randn(8, generator=g), torch.randn(8, generator=g))


def test_real_minilm_l3_merges_with_l6():
    """The real pretrained post-norm BERTs of depth 3 and 6 (the MiniLM wheels): the shallow
    one is expanded with fitted post-norm units, then merged."""
    l3, x = zoo.builtin("minilm-l3", batch=8)
    l6, _ = zoo.builtin("minilm-l6", batch=8)
    calib = [zoo.builtin("minilm-l6", batch=8)[1] for _ in range(2)]
    with pytest.warns(gm.InexactExpansionWarning):
        result = gm.merge([l3.eval(), l6.eval()], calib, x, heads="average", norms="none",
                          progress=False)
    stage = next(a for a in result.alignments if len(set(a.depths)) > 1)
    assert stage.depths == [3, 6] and len(stage.fit_errors) == 2 * 3  # 3 inserted layers
    assert all(0 <= e < 1 for e in stage.fit_errors.values())
    assert "attention.output.LayerNorm" in result.match_graph.graph["post_norm_fit_errors"]
    with torch.no_grad():
        assert torch.isfinite(result.module(*x)).all()


def test_no_model_deepest_in_every_stage():
    """One copy is deeper in the first stage, the other in the later ones: the graph both are
    expanded to is grown by splicing units of the deeper one into each stage, and the merge
    gives the model back."""
    model = _trained_like(zoo.resnet(depths=(1, 2, 2), stem_stride=2))
    first = deepen(model, X[:4], zoo.resnet(depths=(2, 2, 2), stem_stride=2).eval())
    later = gm.permute(deepen(model, X[:4], zoo.resnet(depths=(1, 3, 3), stem_stride=2).eval()),
                       X[:4], seed=3)
    result = gm.merge([first, later], [X[:16], X[16:]], heads="average", norms="none",
                      progress=False)
    assert [a.depths for a in result.alignments] == [[2, 1], [1, 2], [1, 2]]
    assert [a.reference for a in result.alignments] == [0, 1, 1]
    y = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert _rel(model(y), result.module(y)) < 1e-4


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_blocks_that_read_shapes_and_end_in_a_reshaped_norm_align_in_depth(frontend):
    """LeViT-style blocks (`b, n, _ = x.shape`, a branch ending in BatchNorm1d then
    `reshape_as`): the shape reads once counted as trunk structure and the branch had no layer
    that could be zeroed, so a 2-block and a 3-block model were refused."""
    from graphmerge.lab.zoo.registry import build, example_input

    torch.manual_seed(0)
    shallow, deep = build("levit", depth=2).eval(), build("levit", depth=3).eval()
    x = example_input("levit", batch=8)
    result = gm.merge([shallow, deep], [x], x, frontend=frontend, progress=False)
    assert [a.depths for a in result.alignments] == [[2, 3]] and result.alignments[0].inserted
    assert result.coverage.fraction > 0.9
    with torch.no_grad():
        y = result.module(x)
    assert torch.isfinite(y).all() and not torch.allclose(y, deep(x), atol=1e-3)


def _swin(depths):
    from transformers import SwinConfig, SwinForImageClassification

    from hf_models import HFWrapper

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=2, num_channels=3, embed_dim=16,
                        depths=list(depths), num_heads=[2, 4], window_size=4, num_labels=5,
                        attn_implementation="sdpa")
    return HFWrapper(SwinForImageClassification(config), "logits", ("pixel_values",)).eval()


def _mobilebert(layers):
    from transformers import MobileBertConfig, MobileBertModel

    from hf_models import HFWrapper

    torch.manual_seed(0)
    config = MobileBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=4, intermediate_size=64, embedding_size=16,
                              intra_bottleneck_size=16, num_feedforward_networks=4,
                              true_hidden_size=16)
    return HFWrapper(MobileBertModel(config), "last_hidden_state", ("input_ids",),
                     head=(32, 5)).eval()


def test_swin_blocks_pair_into_units_and_deepen_exactly():
    """A Swin stage alternates unshifted and shifted blocks (a roll, a mask): the pair is one
    unit (period 4 of residual adds), the shifted block's mask and the hidden states a stage
    reshapes for an unreturned output are no trunk structure, so stages of 2 and 4 blocks align
    and the shallow model deepens exactly."""
    pytest.importorskip("transformers")
    shallow, deep = _swin((2, 2)), _swin((2, 4))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    unit = find_stages(gm.trace(deep, x[:2], frontend="export"))[1].units[0]
    assert sum(op == ("call_function", "add") for op in unit.signature) >= 4
    assert ("call_function", "roll") in unit.signature
    expanded = deepen(shallow, x[:2], deep)
    with torch.no_grad():
        assert _rel(shallow(x), expanded(x)) < 1e-6
    result = gm.merge([shallow, deep], [x[:2], x[2:]], x[:2], progress=False)
    assert [a.depths for a in result.alignments] == [[1, 1], [1, 2]]


def test_mobilebert_layers_chain_through_their_elementwise_affine():
    """MobileBERT's NoNorm (x · w + b with parameters) follows each residual add: it chains
    the layers into one stage, and an inserted layer is exact with w = 1, b = 0."""
    pytest.importorskip("transformers")
    shallow, deep = _mobilebert(2), _mobilebert(3)
    x = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    expanded = deepen(shallow, x[:2], deep)
    with torch.no_grad():
        assert _rel(shallow(x), expanded(x)) < 1e-6
    result = gm.merge([shallow, deep], [x[:2], x[2:]], x[:2], progress=False)
    assert [a.depths for a in result.alignments][0] == [2, 3]


class _FeatureListDenseNet(nn.Module):
    """A dense net written with feature lists (each layer reads the concatenation of all
    earlier features, as popular libraries write it), `layers[i]` layers in block i."""

    def __init__(self, layers: tuple[int, int], growth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        c = 8
        for i, n in enumerate(layers):
            self.blocks.append(nn.ModuleList(nn.Sequential(
                nn.BatchNorm2d(c + k * growth), nn.ReLU(),
                nn.Conv2d(c + k * growth, growth, 3, 1, 1, bias=False)) for k in range(n)))
            c += n * growth
            if i < len(layers) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(),
                                                      nn.Conv2d(c, 10, 1), nn.AvgPool2d(2)))
                c = 10
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(torch.cat(features, 1)))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.head(torch.relu(x).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("style", ["chain", "feature list"])
def test_dense_blocks_of_different_depths_merge(frontend, style):
    """Deeper dense blocks (in the chained x <- cat([x, f(x)]) style and in the feature-list
    style) are depth and width at once: the shallower model is deepened exactly, merged with
    its deepened copy it comes back, and merged with a deeper independent model the result is
    finite and differs from both."""
    torch.manual_seed(0)
    if style == "chain":
        a, b = zoo.build("densenet", block_layers=(3, 3)), zoo.build(
            "densenet", block_layers=(3, 4))
        x = zoo.example_input("densenet", batch=8)
    else:
        a, b, x = _FeatureListDenseNet((2, 3)), _FeatureListDenseNet((3, 4)), X[:8]
    a, b = _trained_like(a), _trained_like(b)
    deep = deepen(gm.permute(a, x, seed=1, frontend=frontend), x, b, frontend=frontend)
    assert output_error(a, deep, (x,)) < 1e-5
    calib = [x[:4], x[4:]]
    back = gm.merge([a, deep], calib, x, frontend=frontend, progress=False)
    assert back.coverage.fraction > 0.9
    assert _rel(a(x), back.module(x)) < 1e-4
    result = gm.merge([a, b], calib, x, frontend=frontend, progress=False)
    assert [tuple(al.depths) for al in result.alignments] == (
        [(3, 3), (3, 4)] if style == "chain" else [(2, 3), (3, 4)])
    with torch.no_grad():
        y = result.module(x)
    assert torch.isfinite(y).all() and min(_rel(m(x), y) for m in (a, b)) > 1e-3


class _DenseMLP(nn.Module):
    """A dense MLP (feature lists concatenated on the last axis), each layer ending in GELU
    (GELU(0) = 0: a zeroed layer before it writes zeros), optionally LayerNorm first."""

    def __init__(self, layers: int, norm: bool, growth: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.layers = nn.ModuleList(nn.Sequential(
            nn.LayerNorm(8 + growth * k) if norm else nn.Identity(),
            nn.Linear(8 + growth * k, growth), nn.GELU()) for k in range(layers))
        self.head = nn.Linear(8 + growth * layers, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.inp(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, -1)))
        return self.head(torch.cat(features, -1))


def test_dense_layers_ending_in_an_activation_that_keeps_zero_are_inserted_exactly():
    """A dense layer whose branch ends in GELU is a unit (GELU(0) = 0), and an MLP dense
    block deepens exactly; where a LayerNorm normalises the widened concatenation (its mean
    and variance would change with the zeros) the deepening is refused in one line naming
    it."""
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    a, b = _DenseMLP(2, norm=False).eval(), _DenseMLP(4, norm=False).eval()
    deep = deepen(a, x, b)
    assert output_error(a, deep, (x,)) < 1e-6
    back = gm.merge([a, gm.permute(deep, x, seed=3)], [x[:32], x[32:]], x, progress=False)
    assert output_error(a, back.module, (x,)) < 1e-5
    a, b = _DenseMLP(2, norm=True).eval(), _DenseMLP(4, norm=True).eval()
    with pytest.raises(gm.MismatchError, match=r"\(layer_norm\) normalises across the "
                       r"concatenation `cat_\d+` that a dense layer inserted") as e:
        gm.merge([a, b], [x[:32], x[32:]], x, progress=False)
    assert "\n" not in str(e.value)


class _AlternatingDense(nn.Module):
    """Dense layers alternating conv-BN-ReLU and conv-ReLU (post-activation): units of two."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.stem, c, body = nn.Conv2d(1, 8, 3, 1, 1), 8, []
        for k in range(layers):
            body.append(nn.Sequential(nn.Conv2d(c, 4, 3, 1, 1), nn.BatchNorm2d(4), nn.ReLU())
                        if k % 2 == 0 else nn.Sequential(nn.Conv2d(c, 4, 3, 1, 1), nn.ReLU()))
            c += 4
        self.layers, self.head = nn.ModuleList(body), nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.head(x.mean((2, 3)))


def test_an_inserted_unit_of_two_dense_layers_writes_zeros_in_both():
    """Dense layers of two kinds alternate, so a unit is two layers (their period); an
    inserted unit zeroes both branches (its concatenations gain zeros only), exactly, and
    calibration batches of 2 are enough to align and merge."""
    torch.manual_seed(0)
    x = X[:16, :, :12, :12]
    a, b = _trained_like(_AlternatingDense(4)), _trained_like(_AlternatingDense(6))
    assert [s.depth for s in find_stages(gm.trace(b, x))] == [3]
    deep = deepen(a, x, b)
    assert output_error(a, deep, (x,)) < 1e-6
    traced = gm.trace(deep, x)
    values = run_nodes(traced.graph_module, (x,))
    new = [float(values[n.args[0][1].name].abs().max()) for n in traced.graph.nodes
           if n.target is torch.cat]
    assert [v == 0 for v in new] == [False, False, True, True, False, False]
    calibration = [x[k:k + 2] for k in range(0, 16, 2)]
    back = gm.merge([a, gm.permute(deep, x, seed=2)], calibration, x, progress=False)
    assert output_error(a, back.module, (x,)) < 1e-5


def test_a_dense_block_deeper_in_a_model_that_is_not_the_deepest_is_refused_in_one_line():
    """Growing a dense block inside another model's graph (each model deeper in one block) is
    not supported: refused in one line naming the block, never merged silently."""
    a, b = zoo.build("densenet", block_layers=(3, 4)).eval(), zoo.build(
        "densenet", block_layers=(4, 3)).eval()
    x = zoo.example_input("densenet", batch=4)
    with pytest.raises(gm.MismatchError, match=r"is a dense block .* deeper than model \d's, "
                       r"which has the most units") as e:
        gm.merge([a, b], [x], x, progress=False)
    assert "\n" not in str(e.value)


class _UNet(nn.Module):
    """A U-Net with `levels` pooling levels (each a level of resolution and width)."""

    def __init__(self, levels: int, base: int = 4) -> None:
        super().__init__()
        ch = [base * 2 ** i for i in range(levels + 1)]

        def double(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.down = nn.ModuleList([double(1, ch[0])] + [double(ch[i], ch[i + 1])
                                                        for i in range(levels)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2)
                                 for i in range(levels)])
        self.dec = nn.ModuleList([double(2 * ch[i], ch[i]) for i in range(levels)])
        self.out = nn.Conv2d(base, 3, 1)

    def forward(self, x):
        skips = []
        for i, down in enumerate(self.down):
            x = down(nn.functional.max_pool2d(x, 2) if i else x)
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
        return self.out(x)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_unets_with_another_number_of_levels_are_refused_naming_the_node(frontend):
    """A level one U-Net lacks changes resolution and width: no unit of depth, refused with the
    node where the structure differs and why (never merged silently)."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    with pytest.raises(gm.MismatchError, match=r"differ at node \d+: `\w+` .* where the "
                       r"reference has `\w+` \(max_pool\); the reference has a stage there "
                       r"that changes the stream's shape"):
        gm.merge([_UNet(2).eval(), _UNet(3).eval()], [x], x, frontend=frontend, progress=False)

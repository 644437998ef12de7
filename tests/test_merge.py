"""The merge engine: permuted twins recover the model, averaging, heads, bad input, match graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.io.match_graph import read_match_graph, write_match_graph
from graphmerge.lab import zoo
from graphmerge.passes import reset_batch_norms

torch.set_num_threads(2)


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Random affine BatchNorm parameters and running statistics of random 28×28 inputs, as a
    trained model would have (arbitrary running statistics leave many units constant, and
    constant units carry no correlation to match them by)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    reset_batch_norms(model, [(torch.randn(64, 1, 28, 28),)], progress=False)
    return model.eval()


IMG_FAMILIES = {
    "mlp": lambda: zoo.mlp(hidden=(32, 24)),
    "resnet": lambda: zoo.resnet(depths=(1, 2, 1), width=1, stem_stride=2),
    "vgg": lambda: zoo.vgg(channels=(8, "M", 16, "M", 16), hidden=32),
    "vit": lambda: zoo.vit(dim=32, depth=2, heads=4, mlp_dim=48),
}


def _calibration(n=96, batch=32):
    x = torch.randn(n, 1, 28, 28)
    return [x[i:i + batch] for i in range(0, n, batch)]


def _rel(a, b):
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("method", ["zip", "permute"])
@pytest.mark.parametrize("family", sorted(IMG_FAMILIES))
def test_merging_a_permuted_twin_recovers_the_model(family, method):
    model = _randomise_bn(IMG_FAMILIES[family]())
    calib = _calibration()
    twin = gm.permute(model, calib[0], seed=7)
    result = gm.merge([model, twin], calib, method=method, progress=False)
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad():
        assert _rel(model(x), result.module(x)) < 1e-4
    assert all(torch.isfinite(p).all() for p in result.module.state_dict().values()
               if p.is_floating_point())


def test_zipping_three_permuted_copies_recovers_the_model():
    # ZipIt!'s damping would lower a pair's score against its third copy to alpha * 1 and let
    # two correlated units of one copy fold first (relative error 0.13 before)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 32), nn.GELU(),
                          nn.Linear(32, 3))
    calib = [torch.randn(64, 6) for _ in range(2)]
    copies = [model] + [gm.permute(model, calib[0], seed=s) for s in (1, 2)]
    result = gm.merge(copies, calib, progress=False)
    assert all(len(g) == 3 and len({u // p.widths[0] for u in g}) == 3
               for p in result.plans.values() for g in p.groups)  # one unit from each copy
    with torch.no_grad():
        assert _rel(model(calib[1]), result.module(calib[1])) < 1e-5


@pytest.mark.parametrize("method", ["zip", "permute"])
def test_merging_a_permuted_bert_twin_recovers_it(method):
    model = zoo.tiny_bert_classifier().eval()
    ids = torch.randint(0, 100, (24, 10))
    mask = torch.ones(24, 10, dtype=torch.long)
    mask[::3, 7:] = 0
    calib = [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 24, 8)]
    twin = gm.permute(model, calib[0], seed=2)
    result = gm.merge([model, twin], calib, method=method, heads="average", progress=False)
    with torch.no_grad():
        assert _rel(model(ids, mask), result.module(ids, mask)) < 1e-4


def test_reset_norms_recovers_the_model_when_its_statistics_match_the_calibration_data():
    model = _randomise_bn(IMG_FAMILIES["resnet"]())
    calib = _calibration()
    reset_batch_norms(model, [(c,) for c in calib], progress=False)  # model's stats := calibration stats
    twin = gm.permute(model, calib[0], seed=1)
    result = gm.merge([model, twin], calib, heads="average", norms="reset", progress=False)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert _rel(model(x), result.module(x)) < 1e-4
    bn = result.module.get_submodule("stages.1.0.bn1")
    assert bn.momentum == model.stages[1][0].bn1.momentum and not bn.training


def test_average_of_identical_models_is_the_model():
    model = _randomise_bn(IMG_FAMILIES["vgg"]())
    calib = _calibration(64)
    result = gm.merge([model, copy.deepcopy(model), copy.deepcopy(model)], calib,
                      method="average", heads="average", norms="none", progress=False)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(result.module.state_dict()[name], value)


def test_disjoint_heads_are_concatenated_and_the_merged_module_stands_alone():
    a = _randomise_bn(zoo.resnet(depths=(1, 1, 1), num_classes=5, stem_stride=2))
    b = _randomise_bn(zoo.resnet(depths=(1, 1, 1), num_classes=5, stem_stride=2))
    calib = _calibration()
    result = gm.merge([a, b], calib, heads="concat", progress=False)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = result.module(x)
        for p in list(a.parameters()) + list(b.parameters()):
            p.add_(1.0)  # the merged module must not refer to its inputs
        after = result.module(x)
    assert before.shape == (4, 10) and torch.equal(before, after)
    assert result.head_mode == "concat"
    assert result.module.head.out_features == 10


def test_the_default_keeps_model_0s_interface():
    """Under default options the merged model has model 0's inputs and output shape (heads are
    averaged); outputs of different widths are refused with the way out."""
    model = _randomise_bn(IMG_FAMILIES["mlp"]())
    calib = _calibration()
    result = gm.merge([model, gm.permute(model, calib[0])], calib, progress=False)
    assert result.head_mode == "average"
    with torch.no_grad():
        assert result.module(calib[0]).shape == model(calib[0]).shape
    a = zoo.resnet(depths=(1, 1, 1), num_classes=5, stem_stride=2)
    b = zoo.resnet(depths=(1, 1, 1), num_classes=3, stem_stride=2)
    with pytest.raises(gm.ConfigError, match="heads='concat'"):
        gm.merge([a, b], calib, progress=False)
    with pytest.raises(gm.ConfigError, match="average, concat"):
        gm.merge([model, model], calib, heads="auto", progress=False)


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([torch.full((4, 1, 28, 28), float("nan"))], "NaN"),
    ([torch.randn(4, 3, 28, 28)], "shape"),
])
def test_bad_calibration_data_is_refused(bad, match):
    model = IMG_FAMILIES["mlp"]()
    with pytest.raises(gm.DataError, match=match):
        gm.merge([model, copy.deepcopy(model)], bad, example_inputs=torch.randn(2, 1, 28, 28),
                 progress=False)


def test_nan_weights_are_refused():
    a, b = IMG_FAMILIES["mlp"](), IMG_FAMILIES["mlp"]()
    with torch.no_grad():
        b.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(gm.DataError, match="model 1.*layers.0.weight"):
        gm.merge([a, b], _calibration(), progress=False)


def test_models_of_different_families_are_refused():
    with pytest.raises(gm.MismatchError, match="model 1"):
        gm.merge([IMG_FAMILIES["mlp"](), IMG_FAMILIES["vgg"]()], _calibration(), progress=False)


def test_unknown_method_lists_the_valid_ones():
    m = IMG_FAMILIES["mlp"]()
    with pytest.raises(gm.ConfigError, match="zip"):
        gm.merge([m, m], _calibration(), method="magic", progress=False)


def test_match_graph_describes_the_merge(tmp_path):
    model = _randomise_bn(IMG_FAMILIES["resnet"]())
    calib = _calibration()
    result = gm.merge([model, gm.permute(model, calib[0])], calib, heads="average",
                      progress=False)
    g = result.match_graph
    space_edges = [d for u, v, d in g.edges(data=True) if d["kind"] == "match" and "space" in u]
    merged = [d for d in space_edges if d["matcher"] == "zip"]
    assert merged and all(d["mean_correlation"] > 0.999 for d in merged)
    for suffix in (".graphml", ".json", ".dot"):
        path = write_match_graph(g, tmp_path / f"match{suffix}")
        assert path.stat().st_size > 0
        if suffix != ".dot":
            back = read_match_graph(path)
            assert back.number_of_nodes() == g.number_of_nodes()
    assert "space" in result.summary

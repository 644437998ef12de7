"""Capture any model: both front ends, every zoo architecture (ours and community-style) and
transformers models built from small configs. For each: the permutation oracle passes with
parameters changed, a merge with a permuted copy of itself gives the model back, the merged
module exports to ONNX, and the caller's model is untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.graph.oracle import output_error
from graphmerge.lab.zoo.registry import COMMUNITY, FAMILIES, STYLES, builtin

ZOO = sorted(set(FAMILIES) | set(COMMUNITY) - set(STYLES))  # STYLES: test_zoo_community.py
FX_CANNOT = {"gpt"}  # slices a buffer with a traced length: torch.fx fails, export works
TOL = 1e-4


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Running statistics and affine values away from their defaults, so that a norm whose
    axes move wrongly shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) and \
                    m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def _like(x: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """Another batch shaped like x: random floats, random token ids (padding kept), the same
    0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    base = x.repeat(-(-batch // x.shape[0]), *([1] * (x.dim() - 1)))[:batch]
    if x.is_floating_point():
        return torch.randn(base.shape, generator=g)
    if int(x.max()) <= 1:
        return base
    return torch.randint(1, int(x.max()) + 1, base.shape, generator=g) * (base != 0)


def _snapshot(model: nn.Module) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: type(v) for k, v in vars(model).items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, sorted(vars(m))) for n, m in model.named_modules()])


def _assert_unchanged(before: tuple, model: nn.Module) -> None:
    after = _snapshot(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "parameters changed"
    assert before[1:] == after[1:], "attributes or training flags changed"


def check_capture(model: nn.Module, x: tuple, frontend: str, tmp_path) -> dict:
    """The acceptance checks of one model and front end; returns what was measured."""
    before = _snapshot(model)
    traced = gm.trace(model, x, frontend=frontend)
    report = gm.check_spaces(model, x, frontend=frontend)
    assert report.changed_tensors > 0 and report.max_output_error < 1e-6
    twin = gm.permute(model, x, seed=1, frontend=frontend)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     twin.state_dict().values()))
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    result = gm.merge([model, twin], calibration, x, frontend=frontend, progress=False)
    merge_error = output_error(model, result.module, calibration[0])  # default options
    assert merge_error < TOL
    onnx = gm.export_onnx(result.module, x, tmp_path / f"{frontend}.onnx", atol=TOL)
    _assert_unchanged(before, model)
    return {"frontend": traced.frontend, "spaces": len(traced.space_table),
            "free": len(traced.space_table.free), "oracle": report.max_output_error,
            "merge": merge_error, "onnx": onnx.max_abs_diff}


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_architecture(name, frontend, tmp_path):
    if frontend == "fx" and name in FX_CANNOT:
        with pytest.raises(gm.TracingError, match="torch.fx could not trace"):
            gm.trace(builtin(name)[0], builtin(name)[1], frontend="fx")
        return
    kwargs = {"depths": [1, 1, 1], "stem_stride": 2} if name == "resnet" else {}
    model, x = builtin(name, batch=4, **kwargs)
    measured = check_capture(_randomise_norms(model), (x,), frontend, tmp_path)
    assert measured["frontend"] == frontend


def test_auto_falls_back_to_export_and_says_why(caplog):
    model, x = builtin("gpt")
    with caplog.at_level("INFO", logger="graphmerge.graph.capture"):
        traced = gm.trace(model, x)
    assert traced.frontend == "export"
    assert any("torch.fx could not trace GPT" in r.message for r in caplog.records)


def test_a_graph_module_is_taken_as_given():
    model, x = builtin("mlp")
    exported = torch.export.export(model.eval(), (x,), strict=False).module()
    node_names = [n.name for n in exported.graph.nodes]
    traced = gm.trace(exported, x)
    assert traced.frontend == "graph" and traced.graph_module is exported
    assert [n.name for n in traced.graph.nodes] == node_names  # not traced again
    assert any(n.meta.get("nn_module_stack") for n in traced.graph.nodes)
    twin = gm.permute(exported, x, seed=2)
    calibration = [torch.randn(2, 1, 28, 28) for _ in range(16)]  # exported for batch 2
    result = gm.merge([exported, twin], calibration, x, heads="average", norms="none",
                      progress=False)
    assert output_error(exported, result.module, (x,)) < TOL


def test_tracing_never_adds_constants_to_the_callers_model():
    class WithConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x) * torch.tensor([1.0, 2.0, 3.0, 4.0])

    model, x = WithConstant(), torch.randn(5, 3)
    before = _snapshot(model)
    for _ in range(2):
        gm.trace(model, x, frontend="fx")
    _assert_unchanged(before, model)
    twin = gm.permute(model, x, seed=1)
    result = gm.merge([model, twin], [x], heads="average", progress=False)
    assert output_error(model, result.module, (x,)) < TOL


def test_reading_a_weights_dtype_or_shape_links_nothing():
    class ReadsMetadata(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = x.to(self.conv.weight.dtype)
            k = self.conv.weight.shape[-1]
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)) * k)

    model, x = ReadsMetadata(), torch.randn(3, 1, 6, 6)
    table = gm.trace(model, x).space_table
    kernel = [s for s in table if any(a.param == "conv.weight" and a.dim >= 2 for a in s.params)]
    assert all(s.frozen for s in kernel)
    twin = gm.permute(model, x, seed=3)
    assert output_error(model, twin, (x,)) < 1e-6


def test_tied_weights_join_their_spaces_and_stay_tied():
    model, x = builtin("gpt")
    table = gm.trace(model, x).space_table
    names = {a.param for s in table for a in s.params}
    assert "wte.weight" in names and "lm_head.weight" not in names  # one canonical name
    emb = next(s for s in table if any(a.param == "wte.weight" and a.dim == 1 for a in s.params))
    assert not emb.frozen  # the residual stream, read by the tied head, is free
    twin = gm.permute(model, x, seed=4)
    assert twin.lm_head.weight is twin.wte.weight
    result = gm.merge([model, twin], [x], heads="average", norms="none", progress=False)
    merged = dict(result.module.named_parameters(remove_duplicate=False))
    assert merged["lm_head.weight"] is merged["wte.weight"]


def test_statistics_never_read_a_parameter():
    model, x = builtin("functional", batch=16)
    traced = gm.trace(model, x)
    params = {n.name for n in traced.graph.nodes if n.op == "get_attr"}
    reads = [a.node for s in traced.space_table for a in s.reads]
    assert reads and not set(reads) & params


def test_permute_refuses_to_return_a_different_function(monkeypatch):
    from test_spaces import Cumulative

    from graphmerge.graph import rules

    relu_rule = rules.RULES[torch.relu]
    monkeypatch.setitem(rules.RULES, torch.cumsum, relu_rule)  # a wrong rule: cumsum as relu
    with pytest.raises(gm.SpaceCheckError, match="cumsum"):
        gm.permute(Cumulative(), torch.randn(4, 3), seed=1)


def test_unknown_frontend_is_a_config_error():
    model, x = builtin("mlp")
    with pytest.raises(gm.ConfigError, match="auto, fx, export"):
        gm.trace(model, x, frontend="dynamo")
    with pytest.raises(gm.ConfigError, match="frontend"):
        gm.merge([model, copy.deepcopy(model)], [x], frontend="jit")


@pytest.mark.parametrize("name, frontend", [(n, f) for n in ZOO for f in ("fx", "export")
                                             if not (f == "fx" and n in FX_CANNOT)])
def test_zoo_architecture_across_widths(name, frontend):
    """A model merged with a widened, permuted copy of itself gives the model back; a merge at
    1.5× the width runs (shape literals and module attributes follow their spaces)."""
    kwargs = {"depths": [1, 1, 1], "stem_stride": 2} if name == "resnet" else {}
    model, x = builtin(name, batch=4, **kwargs)
    model, x = _randomise_norms(model), (x,)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    wide = gm.widen(gm.permute(model, x, seed=1, frontend=frontend), x, extra=0.5)
    result = gm.merge([model, wide], calibration, x, heads="average", norms="none",
                      frontend=frontend, progress=False)
    assert any(len(set(s["widths"])) > 1 for s in result.spaces)
    assert output_error(model, result.module, calibration[0]) < TOL
    if name == "mha" and frontend == "fx":  # nn.MultiheadAttention holds embed_dim itself
        with pytest.raises(gm.GraphmergeError, match="embed_dim"):
            gm.merge([model, wide], calibration, x, width=1.5, frontend=frontend,
                     progress=False)
        return
    grown = gm.merge([model, wide], calibration, x, width=1.5, frontend=frontend,
                     progress=False)
    with torch.no_grad():
        out, ref = grown.module(*calibration[0]), model(*calibration[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert max(s["width"] for s in grown.spaces) > max(max(s["widths"]) for s in grown.spaces)


DEEPER = {"resnet": {"depths": (2, 3, 2), "stem_stride": 2}, "vit": {"depth": 4},
          "mlp": {"hidden": (256, 256, 256)}, "senet": {"depths": (2, 3)}, "mha": {"depth": 4},
          "mobilenet": {"depths": (1, 3, 3)}, "densenet": {"block_layers": (5, 5)},
          "gpt": {"n_layer": 4}, "convnext": {"depths": (2, 3)}}


@pytest.mark.parametrize("name, frontend", [(n, f) for n in sorted(DEEPER) for f in ("fx", "export")
                                             if not (f == "fx" and n in FX_CANNOT)])
def test_zoo_architecture_across_depths(name, frontend):
    """Deepened (units found in the graph, on fx and exported graphs alike), a model computes
    the same function; merged with a deepened, permuted copy of itself it comes back. Where no
    units of depth are found the refusal is a clear error."""
    from graphmerge.lab.zoo.registry import build

    kwargs = {"depths": [1, 1, 1], "stem_stride": 2} if name == "resnet" else {}
    model, x = builtin(name, batch=4, **kwargs)
    model, x = _randomise_norms(model), (x,)
    reference = build(name, **DEEPER[name]).eval()
    before = _snapshot(model)
    deep = gm.deepen(gm.permute(model, x, seed=1, frontend=frontend), x, reference,
                     frontend=frontend)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    assert output_error(model, deep, calibration[0]) < TOL
    result = gm.merge([model, deep], calibration, x, heads="average", norms="none",
                      frontend=frontend, progress=False)
    _assert_unchanged(before, model)
    assert any(len(set(a.depths)) > 1 for a in result.alignments)
    assert output_error(model, result.module, calibration[0]) < TOL


class _FeatureList(nn.Module):
    """Each layer reads the concatenation of every earlier feature (a feature-list dense
    block), joined by `join` (torch.cat or one of its other spellings)."""

    def __init__(self, join=torch.cat) -> None:
        super().__init__()
        self.join = join
        self.layers = nn.ModuleList(nn.Linear(4 + 3 * k, 3) for k in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(torch.relu(layer(self.join(features, -1))))
        return self.join(features, -1)


@pytest.mark.parametrize("given, join", [("module", torch.cat), ("graph module", torch.cat),
                                         ("module", torch.concat)])
def test_feature_list_concatenations_are_captured_as_a_chain(given, join):
    """cat([a, b, c]) after cat([a, b]) is captured as cat([cat([a, b]), c]): the same values,
    with each layer a unit whose input is the last one's output. A graph module the caller
    passes is not modified."""
    model, x = _FeatureList(join).eval(), torch.randn(5, 4)
    source = torch.fx.symbolic_trace(model) if given == "graph module" else model
    code = source.code if given == "graph module" else None
    traced = gm.trace(source, x)
    cats = [n for n in traced.graph.nodes if n.target is join]
    assert [len(n.args[0]) for n in cats] == [1, 2, 2, 2]
    assert all(n.args[0][0] is prev for prev, n in zip(cats, cats[1:]))
    with torch.no_grad():
        assert torch.equal(traced.graph_module(x), model(x))
    if code is not None:
        assert source.code == code
        lengths = [len(n.args[0]) for n in source.graph.nodes if n.target is join]
        assert lengths == [1, 2, 3, 4]

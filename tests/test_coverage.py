"""Coverage: how many parameters a merge aligns (`graphmerge.match.coverage`), the reasons the
others keep the identity, `MergeResult.coverage` in the summary, `graphmerge inspect` and the
report, the `LowCoverageWarning` below one half and `min_coverage=`."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import graphmerge as gm
from graphmerge.cli import main
from graphmerge.errors import ConfigError, CoverageError, LowCoverageWarning
from graphmerge.graph.spaces import UnsupportedOpWarning
from graphmerge.io.report import write_report
from graphmerge.lab.zoo.registry import builtin
from graphmerge.match.coverage import coverage, share


def _merge(model: nn.Module, x: torch.Tensor, **options):
    """A merge of `model` with a permuted copy of itself."""
    return gm.merge([model, gm.permute(model, x, seed=1)], [x], progress=False, **options)


class Erfcx(nn.Module):
    """A big first layer whose output goes through an op without an axis rule (erfcx), so
    its hidden space is frozen: the first layer keeps the identity, the rest is merged."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 32)
        self.b = nn.Linear(32, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.special.erfcx(self.a(x).clamp(min=0.0))
        return self.c(torch.relu(self.b(h)))


class Tied(nn.Module):
    """One Linear under two names, called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.again = self.mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.inp(x))))
        return self.out(torch.relu(self.again(h)))


def test_mlp_coverage_by_hand():
    model, x = builtin("mlp", batch=32, hidden=(8, 6), num_classes=3, in_features=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowCoverageWarning)
        result = _merge(model, x)
    cov = result.coverage
    # 5→8→6→3: every weight and hidden bias has a merged axis; the logits' bias has none
    assert (cov.aligned, cov.total) == (8 * 5 + 8 + 6 * 8 + 6 + 3 * 6, 123)
    assert cov.fraction == pytest.approx(120 / 123)
    assert [(r.kind, r.elements, r.tensors) for r in cov.reasons] == [
        ("GRAPH_OUTPUT", 3, ("layers.4.bias",))]
    line = "aligned 97.6% of parameters (120 of 123); kept at the identity: 2.4% (touches the " \
           "graph output)"
    assert cov.format() == line and line in result.summary
    # before any merge, from the space table alone: the same (a self-merge plans the same)
    traced = gm.trace(model, x)
    assert coverage(traced.space_table, traced.graph_module) == cov


def test_resnet_coverage_is_nearly_everything():
    model, x = builtin("resnet", batch=16, depths=(1, 1, 1))
    cov = _merge(model, x).coverage
    assert cov.total == sum(p.numel() for p in model.parameters())
    assert cov.total - cov.aligned == 10  # the classifier's bias: the logits
    assert cov.fraction > 0.999 and cov.reasons[0].kind == "GRAPH_OUTPUT"
    assert "aligned >99.9% of parameters" in cov.format()


def test_a_tied_tensor_counts_once():
    model, x = Tied(), torch.randn(32, 4)
    traced = gm.trace(model, x)
    cov = coverage(traced.space_table, traced.graph_module)
    assert cov.total == sum(p.numel() for p in model.parameters()) == 40 + 72 + 27


def test_an_op_without_a_rule_is_the_first_reason_and_warns():
    torch.manual_seed(0)
    model, x = Erfcx(), torch.randn(64, 64)
    with pytest.warns(LowCoverageWarning) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        cov = _merge(model, x).coverage
    assert cov.aligned == 8 * 32 + 8 + 3 * 8  # b (a merged output) and c (a merged input)
    assert cov.total == 64 * 32 + 32 + cov.aligned + 3
    top = cov.reasons[0]
    assert top.kind == "NO_RULE" and "erfcx" in top.text and top.elements == 64 * 32 + 32
    assert set(top.tensors) == {"a.weight", "a.bias"}
    message = str(caught[0].message)
    assert "\n" not in message and "erfcx" in message and f"{cov.fraction:.1%}" in message
    assert "plain weight average" not in message
    assert caught[0].filename == __file__  # it points at the caller of merge


def test_attention_kept_in_place_is_its_own_reason():
    model, x = builtin("vit")
    traced = gm.trace(model, x)
    heads = coverage(traced.space_table, traced.graph_module)
    frozen = coverage(traced.space_table, traced.graph_module, attention="frozen")
    assert heads.fraction > 0.999 and frozen.aligned < heads.aligned
    # the q, k, v biases: their only axis is heads × head dim
    assert frozen.reasons[0].kind == "ATTENTION"
    assert all("bias" in t for t in frozen.reasons[0].tensors)


def test_nothing_aligned_is_a_plain_weight_average():
    x = torch.randn(32, 4)
    with pytest.warns(LowCoverageWarning, match="plain weight average") as caught:
        result = gm.merge([nn.Linear(4, 3), nn.Linear(4, 3)], [x], progress=False)
    assert len([w for w in caught if w.category is LowCoverageWarning]) == 1
    cov = result.coverage
    assert (cov.aligned, cov.total, cov.fraction) == (0, 15, 0.0)
    assert cov.reasons[0].kind in ("GRAPH_OUTPUT", "GRAPH_INPUT")
    assert "aligned 0.0% of parameters (0 of 15)" in result.summary


def test_min_coverage_refuses_and_is_validated():
    x = torch.randn(32, 4)
    with pytest.raises(CoverageError, match=r"0\.0% .*min_coverage=0\.99"):
        gm.merge([nn.Linear(4, 3), nn.Linear(4, 3)], [x], progress=False, min_coverage=0.99)
    model, x = builtin("mlp", batch=32, hidden=(8, 6), num_classes=3, in_features=5)
    assert _merge(model, x, min_coverage=0.9).coverage.aligned == 120
    for bad in (1.5, -0.1, "high", True, float("nan")):
        with pytest.raises(ConfigError, match="min_coverage"):
            gm.MergeConfig(min_coverage=bad)
    assert gm.MergeConfig(min_coverage=0).min_coverage == 0


def test_share_never_rounds_to_the_ends():
    assert [share(v) for v in (0.0, 4e-5, 0.93114, 0.99996, 1.0)] == [
        "0.0%", "<0.1%", "93.1%", ">99.9%", "100.0%"]


def test_inspect_prints_the_coverage(capsys):
    assert main(["inspect", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "a merge of such models: aligned >99.9% of parameters (269,312 of 269,322)" in out


def test_report_has_the_coverage(tmp_path):
    model, x = builtin("mlp", batch=32, hidden=(8, 6), num_classes=3, in_features=5)
    result = _merge(model, x)
    write_report(tmp_path, result, title="coverage")
    data = json.loads((tmp_path / "result.json").read_text())
    assert data["coverage"]["aligned"] == 120 and data["coverage"]["total"] == 123
    assert data["coverage"]["reasons"][0]["kind"] == "GRAPH_OUTPUT"
    assert "Coverage: aligned 97.6% of parameters" in (tmp_path / "report.md").read_text()

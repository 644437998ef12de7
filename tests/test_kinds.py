"""The op vocabulary (`graphmerge.graph.kinds`): one registration teaches every caller a new
activation; one epsilon reader and one target-name reader for every front end."""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import graphmerge as gm
from graphmerge.graph.capture import capture
from graphmerge.graph.kinds import (
    KINDS,
    OpKind,
    identity_on,
    is_activation,
    kind,
    norm_eps,
    register_kind,
    tensor_args,
    target_name,
    value_range,
)
from graphmerge.graph.oracle import output_error
from graphmerge.graph.rules.registry import Op
from graphmerge.graph.stages import find_stages
from graphmerge.surgery.repair import repair_points

X = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
# ELU is the identity on [0, inf) and bounds nothing above its input: a torch activation the
# table does not hold (fx keeps nn.ELU a leaf; a module class defined here would be traced into)
ELU = OpKind("elu", "activation", (nn.ELU,), ("elu",), identity=(0.0, math.inf))


def _stack(units: int) -> nn.Module:
    """Linear → ReLU (trunk: it widens), then `units` plain units Linear(8, 8) → ELU."""
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(),
                         *[m for _ in range(units) for m in (nn.Linear(8, 8), nn.ELU())],
                         nn.Linear(8, 3)).eval()


@pytest.fixture
def elu():
    undo = register_kind(ELU)
    yield ELU
    undo()


def _folds(traced) -> list[str]:
    return [p.node for p in repair_points(traced, {s.id for s in traced.space_table})
            if p.kind == "fold"]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_unknown_activation_ends_no_unit_and_gets_no_repair(frontend):
    traced = gm.trace(_stack(3), X, frontend=frontend)
    assert "elu" not in KINDS
    assert find_stages(traced) == []
    assert len(_folds(traced)) == 1  # only the layer before the ReLU


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_registration_teaches_stages_and_repair(elu, frontend):
    traced = gm.trace(_stack(3), X, frontend=frontend)
    acts = [n for n in traced.graph.nodes if kind(n) == "elu"]
    assert len(acts) == 3 and all(is_activation(n, pointwise=True) for n in acts)
    assert [s.depth for s in find_stages(traced)] == [3]
    # every layer folds: the one before the ReLU and the three before an ELU
    assert len(_folds(traced)) == 4
    assert identity_on(acts[0]) == (0.0, math.inf) and value_range(acts[0]) is None


def test_one_registration_teaches_identity_expansion(elu):
    """An identity unit after the ReLU is exact (its input lies where ELU is the identity);
    one after an ELU is refused (ELU's output is not bounded below by 0)."""
    shallow = _stack(1)
    deep = gm.deepen(shallow, X, _stack(2), positions=[[1]])
    assert output_error(shallow, deep, (torch.randn(16, 6),)) < 1e-6
    with pytest.raises(gm.GraphmergeError, match=r"\(elu\) is the identity on \[0.0, inf\]"):
        gm.deepen(shallow, X, _stack(2), positions=[[0]])


def test_the_identity_interval_is_read_from_the_table():
    undo = register_kind(OpKind("elu", "activation", (nn.ELU,), ("elu",)))
    try:
        with pytest.raises(gm.GraphmergeError, match=r"\(elu\) is the identity on no interval"):
            gm.deepen(_stack(1), X, _stack(2), positions=[[1]])
    finally:
        undo()
    assert "elu" not in KINDS
    with pytest.raises(gm.MismatchError, match="no units of depth"):
        gm.deepen(_stack(1), X, _stack(2), positions=[[1]])


def test_registering_a_subclass_overrides_its_parent_kind_and_undoes():
    class Rectifier(nn.ReLU):
        pass

    model = fx.GraphModule(nn.ModuleDict({"act": Rectifier()}), _module_graph("act"))
    (node,) = [n for n in model.graph.nodes if n.op == "call_module"]
    assert kind(node) == "relu"
    undo = register_kind(OpKind("rectifier", "activation", (Rectifier,)))
    assert kind(node) == "rectifier" and identity_on(node) is None
    undo()
    assert kind(node) == "relu" and identity_on(node) == (0.0, math.inf)


def _module_graph(target: str) -> fx.Graph:
    g = fx.Graph()
    g.output(g.call_module(target, (g.placeholder("x"),)))
    return g


class _Norms(nn.Module):
    """The same three norms as modules and as functions, each with its own epsilon."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.bn = nn.BatchNorm1d(8, eps=1e-3)
        self.ln = nn.LayerNorm(8, eps=1e-4)
        self.rms = nn.RMSNorm(8, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.functional:
            return self.rms(self.ln(self.bn(x)))
        bn, ln, rms = self.bn, self.ln, self.rms
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1,
                         1e-3)
        x = F.layer_norm(x, [8], ln.weight, ln.bias, eps=1e-4)
        return F.rms_norm(x, [8], rms.weight, 1e-6)


def _eps_by_kind(traced_graph: fx.Graph) -> dict[str, float]:
    return {kind(n): norm_eps(n) for n in traced_graph.nodes
            if kind(n) in ("batch_norm", "layer_norm", "rms_norm")}


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_module_functional_and_aten_norms_give_one_epsilon(functional, frontend):
    x = torch.randn(4, 8)
    traced = capture(_Norms(functional).eval(), x, frontend=frontend)  # no spaces needed
    assert _eps_by_kind(traced.graph) == pytest.approx(
        {"batch_norm": 1e-3, "layer_norm": 1e-4, "rms_norm": 1e-6})


def test_decomposed_batch_norm_and_defaults():
    """aten._native_batch_norm_legit_no_training places eps one argument earlier; a call that
    gives none has its kind's default; a non-norm has none."""
    model = nn.Sequential(nn.BatchNorm1d(8, eps=1e-3)).eval()
    graph = torch.export.export(model, (torch.randn(4, 8),)).run_decompositions().graph
    (bn,) = [n for n in graph.nodes if kind(n) == "batch_norm"]
    assert target_name(bn) == "_native_batch_norm_legit_no_training"
    assert norm_eps(bn) == pytest.approx(1e-3)

    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    ln = g.call_function(F.layer_norm, (x, [8], w))
    relu = g.call_function(F.relu, (ln,))
    assert norm_eps(ln) == 1e-5
    with pytest.raises(ValueError, match="not a norm"):
        norm_eps(relu)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.fc(x))
        return torch.add(y.view(4, 8), x) + 1


def test_target_names_on_fx_and_export_graphs():
    x = torch.randn(4, 8)
    fx_graph = gm.trace(_Mixed(), x, frontend="fx")
    names = {n.op: [] for n in fx_graph.graph.nodes}
    for n in fx_graph.graph.nodes:
        names[n.op].append(target_name(n))
    assert names["call_module"] == ["fc"]
    assert names["call_function"] == ["relu", "add", "add"]
    assert names["call_method"] == ["view"]

    exported = gm.trace(_Mixed(), x, frontend="export")
    calls = [target_name(n) for n in exported.graph.nodes if n.op == "call_function"]
    assert {"linear", "relu", "view", "add"} <= set(calls)  # aten.view.default -> "view"

    for traced in (fx_graph, exported):
        for n in traced.graph.nodes:
            if n.op in ("call_function", "call_method"):
                assert Op(n, None, traced.shapes).name == target_name(n)
    (fc,) = [n for n in fx_graph.graph.nodes if n.op == "call_module"]
    assert Op(fc, fx_graph.graph_module.fc, fx_graph.shapes).name == "Linear"


def test_a_target_without_a_name():
    g = fx.Graph()
    x = g.placeholder("x")
    n = g.call_function(operator.add, (x, 1))
    assert target_name(n) == "add"
    n.target = _Nameless()
    assert target_name(n) == ""
    assert Op(n, None, {}).name == repr(n.target)


class _Nameless:
    def __call__(self, *args):
        return args[0]

    def __repr__(self) -> str:
        return "<nameless>"


def test_torch_batch_norm_reads_its_arguments_in_aten_order():
    # F.batch_norm(x, running_mean, running_var, weight, bias, …) and torch.batch_norm(x,
    # weight, bias, running_mean, running_var, …) place their tensors differently
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4, eps=1e-3)

        def forward(self, x):
            b = self.bn
            y = F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias, False, 0.1,
                             b.eps)
            return torch.batch_norm(y, b.weight, b.bias, b.running_mean, b.running_var, False,
                                    0.1, b.eps, False)

    gm_ = fx.symbolic_trace(Both())
    calls = [n for n in gm_.graph.nodes if n.op == "call_function"]
    assert len(calls) == 2
    for n in calls:
        assert tensor_args(n) == {"weight": "bn.weight", "bias": "bn.bias",
                                  "running_mean": "bn.running_mean",
                                  "running_var": "bn.running_var"}
        assert norm_eps(n) == pytest.approx(1e-3)

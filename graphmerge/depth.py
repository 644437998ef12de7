"""Depth alignment and layer-segment expansion: models of one family but different depths are
brought to one topology before merging.

For each stage (see `graphmerge.blocks`) the deepest model is the reference; every shallower
model's units are aligned to it by CKA and dynamic programming (`graphmerge.align`), then the
shallow model is expanded: its unit k sits at position l_k and every other position gets an
**identity unit** of the same structure — a residual block whose branches output zero, or, in a
plain ReLU stack, an identity linear/conv with an identity norm (exact because its input is
non-negative). The expansion is checked to be exact on the example inputs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from .align import CKAAccumulator, align
from .blocks import Stage, Unit, find_stages
from .compile import set_tensor, sync_module_attributes
from .errors import GraphmergeError, MismatchError
from .stats import feature_module, split_batch
from .trace import Traced, as_inputs, trace

__all__ = ["StageAlignment", "expand", "deepen", "align_depths"]

log = logging.getLogger(__name__)

_IDENTITY_LIKE = (nn.Identity, nn.Dropout)


@dataclass
class StageAlignment:
    """The alignment of one stage: depths of every model, the reference (deepest) model, and
    for every model the reference positions of its units (its CKA matrix against the
    reference: rows = reference units, columns = its units)."""

    stage: int
    container: str
    depths: list[int]
    reference: int
    positions: list[list[int]]
    cka: list[np.ndarray | None] = field(default_factory=list)


# ---- identity units -------------------------------------------------------------------------


def _resize(t: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Every axis of size `old` cut or tiled to size `new` (a template from a wider model)."""
    if old == new:
        return t
    for d in range(t.dim()):
        if t.shape[d] == old:
            idx = torch.arange(new) % old
            t = t.index_select(d, idx)
    return t


def _fit_width(module: nn.Module, old: int, new: int) -> nn.Module:
    with torch.no_grad():
        for name, t in list(module.state_dict(keep_vars=True).items()):
            if t.dim() and old in t.shape:
                set_tensor(module, name, _resize(t.detach(), old, new).clone())
    sync_module_attributes(module)
    return module


def _zero_branches(unit_module: nn.Module, traced: Traced, unit: Unit) -> None:
    """Make a residual unit the identity: zero the parameters that produce every residual
    branch (the last norm's affine, or the last linear/conv), found in the traced graph."""
    prefix = f"{unit.container}.{unit.children[0]}."

    def inside(n: fx.Node) -> bool:
        for k, v in (n.meta.get("nn_module_stack") or {}).items():
            path = str(v[0] if isinstance(v, tuple) else k)
            if path == prefix[:-1] or path.startswith(prefix):
                return True
        return False

    nodes = [n for n in traced.graph.nodes if n.op != "get_attr" and inside(n)]
    stream = {unit.input}
    zeroed = 0
    for n in nodes:
        if n.op == "call_module" and isinstance(traced.graph_module.get_submodule(n.target),
                                                _IDENTITY_LIKE):
            if n.args and getattr(n.args[0], "name", None) in stream:
                stream.add(n.name)
            continue
        if n.op == "call_function" and getattr(n.target, "__name__", "") in ("add", "iadd"):
            operands = [a for a in n.args if isinstance(a, fx.Node)]
            skip = [a for a in operands if a.name in stream]
            branch = [a for a in operands if a.name not in stream]
            if len(skip) != 1 or len(branch) != 1:
                continue
            producer = branch[0]
            if producer.op != "call_module" or not str(producer.target).startswith(prefix):
                raise GraphmergeError(
                    f"cannot make unit {prefix[:-1]} an identity: its residual branch ends in "
                    f"`{producer.name}` ({producer.op}), not in a layer with weights")
            layer = unit_module.get_submodule(str(producer.target)[len(prefix):])
            with torch.no_grad():
                for p in ("weight", "bias"):
                    if getattr(layer, p, None) is not None:
                        getattr(layer, p).zero_()
            stream.add(n.name)
            zeroed += 1
    if not zeroed:
        raise GraphmergeError(f"unit {prefix[:-1]} has no residual add to make an identity of")


def _identity_layer(modules: list[nn.Module]) -> list[nn.Module]:
    """linear/conv → identity, norm → identity, activation kept (input is non-negative)."""
    out = []
    with torch.no_grad():
        for m in modules:
            m = copy.deepcopy(m)
            if isinstance(m, nn.Linear):
                if m.in_features != m.out_features:
                    raise GraphmergeError("an identity layer needs equal in and out features")
                m.weight.copy_(torch.eye(m.out_features))
            elif isinstance(m, nn.modules.conv._ConvNd):
                if m.groups != 1 or m.in_channels != m.out_channels or m.stride != (1,) * len(
                        m.stride):
                    raise GraphmergeError("an identity conv needs groups=1, stride 1, in=out")
                nn.init.dirac_(m.weight)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)
            elif isinstance(m, nn.LayerNorm):
                raise GraphmergeError("a LayerNorm layer has no exact identity")
            if getattr(m, "bias", None) is not None and not isinstance(
                    m, nn.modules.batchnorm._BatchNorm):
                m.bias.zero_()
            out.append(m)
    return out


def _unit_modules(model: nn.Module, unit: Unit) -> list[nn.Module]:
    container = model.get_submodule(unit.container)
    return [container[j] for j in unit.children]


def _stream_width(traced: Traced, unit: Unit) -> int:
    shape = traced.shapes[unit.output]
    return shape[1] if len(shape) == 4 else shape[-1]


def expand(model: nn.Module, traced: Traced, stages: Sequence[Stage],
           plan: dict[int, tuple[list[int], int, nn.Module, Traced, Stage]],
           example_inputs: Any, rtol: float = 1e-5) -> nn.Module:
    """A deeper copy of `model`: for stage s in `plan` = (positions, depth, reference model,
    reference trace, reference stage), unit k goes to positions[k] and identity units fill the
    other positions. Checked to compute the same outputs on `example_inputs`."""
    out = copy.deepcopy(model)
    by_container: dict[str, list[tuple[int, Stage]]] = {}
    for s, stage in enumerate(stages):
        by_container.setdefault(stage.container, []).append((s, stage))
    for container, items in by_container.items():
        old = model.get_submodule(container)
        children: list[nn.Module] = []
        placed: dict[int, list[nn.Module]] = {}
        for s, stage in items:
            if s not in plan:
                continue
            positions, depth, ref_model, ref_traced, ref_stage = plan[s]
            width = _stream_width(traced, stage.units[-1])
            new_units: list[list[nn.Module]] = []
            k = 0
            for p in range(depth):
                if k < len(positions) and positions[k] == p:
                    new_units.append([copy.deepcopy(m) for m in _unit_modules(model, stage.units[k])])
                    k += 1
                    continue
                ref_unit = ref_stage.units[p]
                ref_width = _stream_width(ref_traced, ref_unit)
                template = [_fit_width(copy.deepcopy(m), ref_width, width)
                            for m in _unit_modules(ref_model, ref_unit)]
                if ref_unit.kind == "residual":
                    _zero_branches(template[0], ref_traced, ref_unit)
                    new_units.append(template)
                else:
                    new_units.append(_identity_layer(template))
            first = stage.units[0].children[0]
            placed[first] = [m for unit in new_units for m in unit]
            for unit in stage.units:
                for j in unit.children:
                    placed.setdefault(j, [])
        for j, child in enumerate(old):
            children.extend(placed[j] if j in placed else [child])
        new = nn.Sequential(*children) if isinstance(old, nn.Sequential) else nn.ModuleList(
            children)
        parent_name, _, leaf = container.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, leaf, new)
    out.eval()
    inputs = as_inputs(example_inputs)
    with torch.no_grad():
        a, b = model.eval()(*inputs), out(*inputs)
    err = float((a - b).norm() / a.norm().clamp_min(1e-12))
    if err > rtol:
        raise GraphmergeError(
            f"the identity expansion of {type(model).__name__} is not exact (relative error "
            f"{err:.1e}); identity units need non-negative inputs (ReLU before each unit)")
    return out


def deepen(model: nn.Module, example_inputs: Any, reference: nn.Module,
           positions: Sequence[Sequence[int]] | None = None) -> nn.Module:
    """`model` expanded to `reference`'s depth in every stage, with identity units (templates
    from `reference`). `positions[s]` places model's units in stage s (default: evenly, first
    and last fixed). Computes exactly the function of `model`."""
    traced, ref_traced = trace(model, example_inputs), trace(reference, example_inputs)
    stages, ref_stages = find_stages(traced), find_stages(ref_traced)
    if len(stages) != len(ref_stages):
        raise MismatchError(f"the model has {len(stages)} stages, the reference "
                            f"{len(ref_stages)}")
    plan = {}
    for s, (st, ref) in enumerate(zip(stages, ref_stages)):
        if st.depth > ref.depth:
            raise MismatchError(f"stage {s} ({st.container}) is deeper in the model "
                                f"({st.depth}) than in the reference ({ref.depth})")
        if st.depth < ref.depth:
            pos = list(positions[s]) if positions is not None else align(
                np.zeros((ref.depth, st.depth)), "uniform")
            plan[s] = (pos, ref.depth, reference, ref_traced, ref)
    return expand(model, traced, stages, plan, example_inputs) if plan else copy.deepcopy(model)


# ---- alignment ------------------------------------------------------------------------------


def align_depths(models: list[nn.Module], traced: list[Traced], batches: Sequence[Any],
                 n_inputs: int, example_inputs: Any, method: str = "lma",
                 progress: bool = True) -> tuple[list[nn.Module], list[StageAlignment]]:
    """Expand every model to the deepest topology, stage by stage. Returns the (possibly new)
    models and the alignment of every stage. Models of equal depths come back unchanged."""
    stages = [find_stages(t) for t in traced]
    counts = [len(s) for s in stages]
    if len(set(counts)) > 1:
        i = next(i for i, c in enumerate(counts) if c != counts[0])
        raise MismatchError(f"model {i} has {counts[i]} stages, model 0 has {counts[0]}: models "
                            f"of different depth must have the same stages")
    alignments = []
    for s in range(counts[0]):
        depths = [st[s].depth for st in stages]
        ref = int(np.argmax(depths))
        alignments.append(StageAlignment(s, stages[ref][s].container, depths, ref,
                                         [list(range(d)) for d in depths],
                                         [None] * len(models)))
    todo = [(a, i) for a in alignments for i, d in enumerate(a.depths)
            if d < a.depths[a.reference]]
    if not todo:
        return models, alignments
    # one pass over the calibration data: outputs of every unit of the stages to align
    wanted = {i: sorted({u.output for a, j in todo if j == i or a.reference == i
                         for u in stages[i][a.stage].units}) for i in range(len(models))}
    runners = {i: feature_module(traced[i].graph_module, names).eval()
               for i, names in wanted.items() if names}
    acc = {(a.stage, i): CKAAccumulator(a.depths[a.reference], a.depths[i]) for a, i in todo}
    with torch.no_grad():
        for batch in tqdm(batches, desc="unit CKA", disable=not progress, leave=False):
            inputs = split_batch(batch, n_inputs)
            if len(inputs[0]) < 4:  # the unbiased HSIC estimator needs 4 samples
                continue
            feats = {i: run(*inputs)[1] for i, run in runners.items()}
            for (s, i), cka in acc.items():
                a = alignments[s]
                ref_units = stages[a.reference][s].units
                cka.update([feats[a.reference][u.output] for u in ref_units],
                           [feats[i][u.output] for u in stages[i][s].units])
    plans: dict[int, dict[int, tuple]] = {}
    for (s, i), cka in acc.items():
        a = alignments[s]
        a.cka[i] = cka.result()
        a.positions[i] = align(a.cka[i], method)
        plans.setdefault(i, {})[s] = (a.positions[i], a.depths[a.reference],
                                      models[a.reference], traced[a.reference],
                                      stages[a.reference][s])
    out = list(models)
    for i, plan in plans.items():
        out[i] = expand(models[i], traced[i], stages[i], plan, example_inputs)
        log.info("model %d expanded to the deepest topology: %s", i,
                 {alignments[s].container: plan[s][0] for s in plan})
    return out, alignments

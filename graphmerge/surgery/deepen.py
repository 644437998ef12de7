"""Layer-segment expansion: a shallower model made as deep as a reference, computing the same
function.

For each stage (see `graphmerge.graph.stages`) the model's unit k sits at position l_k of the
reference's depth and every other position gets an **identity unit** of the reference's
structure — a residual block whose branches output zero, or, in a plain ReLU stack, an identity
linear/conv with an identity norm (exact because its input is non-negative). The expansion is
checked to be exact on the example inputs. `deepen` places units evenly; the `align_depths`
pass places them by CKA alignment.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import GraphmergeError, InexactExpansionWarning, MismatchError
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import Traced, set_eval
from graphmerge.graph.oracle import output_error
from graphmerge.graph.stages import Stage, Unit, find_stages, is_add
from graphmerge.inputs import as_inputs
from graphmerge.match.align import align
from graphmerge.surgery.tensors import set_tensor, sync_module_attributes

__all__ = ["expand", "deepen", "fit_post_norms"]

log = logging.getLogger(__name__)

_IDENTITY_LIKE = (nn.Identity, nn.Dropout)
_POST_NORMS = (nn.LayerNorm,)


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


def _zero_branches(unit_module: nn.Module, traced: Traced, unit: Unit) -> list[str]:
    """Make a residual unit the identity: zero the parameters that produce every residual
    branch (the last norm's affine, or the last linear/conv), found in the traced graph.

    Returns the norms that sit on the stream after a residual add (post-norm, x ← LN(x + f(x))),
    relative to the unit: with a zero branch they still normalise, so no setting makes the
    unit exact; `fit_post_norms` fits their affine instead."""
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
    post_norms: list[str] = []
    adds: set[str] = set()
    for n in nodes:
        module = (traced.graph_module.get_submodule(n.target) if n.op == "call_module"
                  else None)
        on_stream = bool(n.args) and getattr(n.args[0], "name", None) in stream
        if isinstance(module, _IDENTITY_LIKE):
            if on_stream:
                stream.add(n.name)
            continue
        if isinstance(module, _POST_NORMS) and on_stream and n.args[0].name in adds and len(
                n.args[0].users) == 1 and str(n.target).startswith(prefix):
            # the sum's only reader is this norm: the stream itself is normalised (post-norm);
            # a pre-norm reads a sum that the next add reads too
            post_norms.append(str(n.target)[len(prefix):])
            stream.add(n.name)
            continue
        if is_add(n):
            operands = [a for a in n.args if isinstance(a, fx.Node)]
            skip = [a for a in operands if a.name in stream]
            branch = [a for a in operands if a.name not in stream]
            if len(skip) != 1 or len(branch) != 1:
                continue
            producer = _weighted_producer(branch[0], prefix)
            if producer is None:
                raise GraphmergeError(
                    f"cannot make unit {prefix[:-1]} an identity: its residual branch "
                    f"`{branch[0].name}` does not come from a layer with weights through ops "
                    f"that keep a zero (scaling, indexing, dropout)")
            _zero_producers(unit_module, prefix, producer, traced)
            stream.add(n.name)
            adds.add(n.name)
            zeroed += 1
    if not zeroed:
        raise GraphmergeError(f"unit {prefix[:-1]} has no residual add to make an identity of")
    return post_norms


_KEEP_ZERO = {"mul", "imul", "getitem", "dropout", "contiguous", "clone", "to", "float"}


def _weighted_producer(node: fx.Node, prefix: str) -> fx.Node | None:
    """The layer with weights whose zero output makes `node` zero: `node` itself, or reached
    back through ops that map zero to zero (a product such as layer scale or squeeze-and-
    excitation, taking an item of a tuple output, dropout, casts)."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if not isinstance(module, _IDENTITY_LIKE):
            weighted = any(True for _ in module.parameters())
            return node if weighted and str(node.target).startswith(prefix) else None
        name = "dropout"
    else:
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        name = name.partition(".")[0]  # aten.mul.Tensor -> mul
    inputs = [a for a in node.args if isinstance(a, fx.Node) and a.op != "get_attr"]
    if name not in _KEEP_ZERO or not inputs:
        return None
    if name in ("mul", "imul"):  # zero when one factor is: follow the one a layer makes
        return next((p for p in (_weighted_producer(a, prefix) for a in inputs) if p), None)
    return _weighted_producer(inputs[0], prefix)


def _zero_producers(unit_module: nn.Module, prefix: str, node: fx.Node, traced: Traced) -> None:
    """Zero the parameters of layer `node` that write its output space (its `out` axes, from
    the space table): the layer then outputs exactly zero."""
    table = traced.space_table
    piece = node.name if node.name in table.node_axes else f"{node.name}#0"
    dims = table.node_axes.get(piece, {})
    space = table[dims[max(dims)]] if dims else None
    owner = f"{node.target}."
    names = {a.param for a in (space.producers if space else ()) if a.param.startswith(owner)}
    if not names:  # no space table entry: the layer's own weight and bias
        names = {f"{owner}{p}" for p in ("weight", "bias")
                 if getattr(traced.graph_module.get_submodule(node.target), p, None) is not None}
    named = dict(unit_module.named_parameters())  # running statistics are not zeroed: with a
    with torch.no_grad():                          # zero affine a norm outputs zero anyway
        for name in names:
            if name[len(prefix):] in named:
                named[name[len(prefix):]].zero_()


def fit_post_norms(model: nn.Module, norms: Sequence[tuple[str, nn.Module]],
                   batches: Sequence[tuple[Any, ...]]) -> dict[str, float]:
    """Give each post-norm of an inserted unit (whose branch is zero, so its input is the
    stream x) the per-channel affine that best reproduces x from LN's normalised x, in closed
    form (least squares over every token of `batches`), in forward order. Returns, per norm,
    the relative error ||LN(x) − x|| / ||x|| left on the data."""
    errors: dict[str, float] = {}
    for name, norm in norms:
        seen: list[torch.Tensor] = []
        hook = norm.register_forward_hook(lambda m, args, out: seen.append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        try:
            with torch.no_grad():
                for inputs in batches:
                    model(*inputs)
        finally:
            hook.remove()
        x = torch.cat(seen)
        z = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True)
                                                       + norm.eps)
        zc, xc = z - z.mean(0), x - x.mean(0)
        w = (zc * xc).sum(0) / (zc * zc).sum(0).clamp_min(1e-12)
        b = x.mean(0) - w * z.mean(0)
        with torch.no_grad():
            norm.weight.copy_(w.to(norm.weight.dtype))
            norm.bias.copy_(b.to(norm.bias.dtype))
        errors[name] = float((z * w + b - x).norm() / x.norm().clamp_min(1e-12))
    return errors


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
           example_inputs: Any, rtol: float = 1e-5,
           calibration: Sequence[tuple[Any, ...]] = ()) -> tuple[nn.Module, dict[str, float]]:
    """A deeper copy of `model`: for stage s in `plan` = (positions, depth, reference model,
    reference trace, reference stage), unit k goes to positions[k] and identity units fill the
    other positions. Checked to compute the same outputs on `example_inputs`.

    Post-norm units (x ← LN(x + f(x))) cannot be exact: their norms get the affine that best
    reproduces their input on `calibration` (default: the example inputs); the returned dict
    gives, per fitted norm, the relative error left, and an InexactExpansionWarning names
    them. Everywhere else exactness is required (GraphmergeError otherwise)."""
    out = copy.deepcopy(model)
    post: list[tuple[str, nn.Module]] = []
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
                    for rel in _zero_branches(template[0], ref_traced, ref_unit):
                        post.append((f"{container}[{p}].{rel}", template[0].get_submodule(rel)))
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
    set_eval(out)
    inputs = as_inputs(example_inputs)
    fit = fit_post_norms(out, post, list(calibration) or [inputs]) if post else {}
    err = output_error(model, out, inputs)
    if post:
        warnings.warn(
            f"{type(model).__name__} has post-norm units (x <- LN(x + f(x))), for which no "
            f"identity exists: the inserted units' norms were fitted to reproduce their input, "
            f"leaving relative errors {', '.join(f'{k} {v:.1e}' for k, v in fit.items())} "
            f"(output error {err:.1e})", InexactExpansionWarning, stacklevel=2)
    elif err > rtol:
        raise GraphmergeError(
            f"the identity expansion of {type(model).__name__} is not exact (relative error "
            f"{err:.1e}); identity units need non-negative inputs (ReLU before each unit)")
    return out, fit


def deepen(model: nn.Module, example_inputs: Any, reference: nn.Module,
           positions: Sequence[Sequence[int]] | None = None,
           calibration: Sequence[tuple[Any, ...]] = ()) -> nn.Module:
    """`model` expanded to `reference`'s depth in every stage, with identity units (templates
    from `reference`). `positions[s]` places model's units in stage s (default: evenly, first
    and last fixed). Computes exactly the function of `model`, except for post-norm units,
    whose norms are fitted on `calibration` (see `expand`)."""
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
    if not plan and len(traced.graph.nodes) != len(ref_traced.graph.nodes):
        raise MismatchError(
            f"{type(model).__name__} and the reference differ ({len(traced.graph.nodes)} vs "
            f"{len(ref_traced.graph.nodes)} graph nodes) but no stage of units of depth tells "
            f"them apart ({len(stages)} stages found, of depths {[s.depth for s in stages]}); "
            f"deepen() finds units in nn.Sequential/nn.ModuleList containers only")
    if not plan:
        return copy.deepcopy(model)
    return expand(model, traced, stages, plan, example_inputs, calibration=calibration)[0]

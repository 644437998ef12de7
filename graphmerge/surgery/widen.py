"""Function-preserving growth of a model: wider spaces made of duplicated units.

`widen(model, inputs, extra=0.5)` adds units to every free space by duplicating existing ones:
producers (`out` axes) copy the unit, consumers (`in` axes) share its weight among the copies,
so the wider model computes the same function. Used to test heterogeneous-width merging
(a narrow model merged with a widened copy of itself must give back its function).

`heads=` and `head_dim=` add attention heads and head dims (per heads space, per head dim):
their new units are zero (zero queries, keys and values: q·kᵀ, the softmax's input and the
output do not change), and the widened model is then the traced graph module, its shape
literals (view(b, t, heads, head_dim)) rewritten to the new widths.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch
from torch import nn

from graphmerge.errors import ConfigError, GraphmergeError, summarize
from graphmerge.graph.analyse import trace
from graphmerge.graph.capture import plain_weights, set_eval
from graphmerge.graph.literals import (find_literals, merged_widths, module_groups,
                                       resize_literals)
from graphmerge.graph.oracle import check_seed, check_tolerance, output_error
from graphmerge.graph.transforms import SELECTIONS, Selection, compose
from graphmerge.inputs import as_inputs
from graphmerge.graph.tensors import named_tensors, set_tensor, sync_module_attributes

__all__ = ["widen"]

def widen(model: nn.Module, example_inputs: Any, extra: float | int = 0.5, seed: int = 0,
          rtol: float = 1e-4, heads: int = 0, head_dim: int = 0) -> nn.Module:
    """A copy of `model` whose free spaces are wider by `extra` (a ratio, or a number of units)
    and that computes the same function (checked on the example inputs).

    Spaces that some op reduces over (a norm, mean, sum or softmax over their units) keep their
    width: duplicating units would change the statistics. A width held outside the graph (a
    module attribute the forward code reads) cannot be rewritten: such a model is refused.
    """
    if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not (
            math.isfinite(extra) and extra >= 0):
        raise ConfigError(f"extra must be a non-negative ratio or number of units, got {extra!r}")
    for name, value in (("heads", heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be a non-negative number of units, got {value!r}")
    check_seed(seed)
    check_tolerance(rtol)
    inputs = as_inputs(example_inputs)
    traced = trace(model, inputs)
    table = traced.space_table
    g = torch.Generator().manual_seed(seed)
    # attention heads and head dims grow by zero units only (`heads`, `head_dim`): copies
    # would add to queries · keys, which sums over the head dim
    zero = _head_units(table, heads, head_dim)
    added = {s.id: zero[s.id] if s.id in zero else 0 if s.frozen or s.reduced else (
        extra if isinstance(extra, int) else round(extra * s.width))
        for s in table if s.derived is None}
    plain = plain_weights(model)  # parametrized tensors as plain ones, as the table has them
    _check_size(plain, table, added, extra)
    base, masks = _selections(table, added, zero, g)

    def own(sid: int, _: bool) -> Selection | None:
        return base.get(sid)

    def own_mask(sid: int, _: bool) -> Selection | None:
        b = base.get(sid)
        return masks.get(sid) or (None if b is None else Selection.of(b.index, b.width))

    grow = {s.id: compose(table, s.id, own, SELECTIONS) for s in table}
    keep = {s.id: compose(table, s.id, own_mask, SELECTIONS) for s in table} if masks else {}
    roles = {(a.param, a.dim): a.role for s in table for a in s.params}
    widths = merged_widths(table, {sid: table[sid].width + n for sid, n in added.items()})
    if masks:  # a head count or head dim is often a module attribute: the graph module
        wide = copy.deepcopy(traced.graph_module)
        resize_literals(wide, find_literals(traced), widths)
        wide.recompile()
    else:
        wide = plain if plain is not model else copy.deepcopy(model)
    named = named_tensors(wide)
    with torch.no_grad():
        for name, dims in table.param_axes.items():
            t = named[name].detach()
            for dim, sid in dims.items():  # the selections (CPU) moved to the tensor's device
                t = t.index_select(dim, grow[sid].index.to(t.device))
                if roles.get((name, dim)) == "in" and t.is_floating_point():
                    # readers of a duplicated unit share its weight among the copies (scaled
                    # in float64: 1/3 has no exact low-precision value)
                    shape = [1] * t.dim()
                    shape[dim] = -1
                    scale = grow[sid].scale.to(t.device).reshape(shape)
                    t = (t.double() * scale).to(t.dtype)
                if sid in keep and t.is_floating_point() and not bool(keep[sid].scale.all()):
                    shape = [1] * t.dim()
                    shape[dim] = -1
                    t = t * keep[sid].scale.to(t.device, t.dtype).reshape(shape)
            set_tensor(wide, name, t.contiguous())
    sync_module_attributes(wide, module_groups(traced, widths))
    set_eval(wide)
    try:
        err = output_error(model, wide, inputs)
    except Exception as e:  # a width the forward code reads from elsewhere
        raise GraphmergeError(
            f"the widened {type(model).__name__} does not run ({summarize(e)}): a width is held outside the graph (e.g. a "
            f"module attribute read by forward); widen() cannot rewrite it") from e
    if err > rtol:
        raise GraphmergeError(f"widening changed the model's outputs (relative error {err:.1e}); "
                              f"a space is normalised in a way widen() does not detect")
    return wide


def _selections(table: Any, added: dict[int, int], zero: dict[int, int],
                g: torch.Generator) -> tuple[dict[int, Selection], dict[int, Selection]]:
    """Per base space, the selection of its widened units (copies of random units; readers
    scaled by 1 / copies), and for heads and head dims (`zero`) a mask: 1 on the old units,
    0 on the new ones (readers keep their weight: the new units are zero)."""
    base: dict[int, Selection] = {}
    masks: dict[int, Selection] = {}
    for s in table:
        if s.derived is not None:
            continue
        index = torch.cat([torch.arange(s.width), torch.randint(0, s.width, (added[s.id],),
                                                                generator=g)])
        copies = torch.bincount(index, minlength=s.width).double()
        base[s.id] = Selection(index, 1.0 / copies[index], s.width)  # scale: 1 / copies
        if zero.get(s.id):  # (none added: the model keeps its own form)
            base[s.id] = Selection.of(index, s.width)
            masks[s.id] = Selection(index, (torch.arange(len(index)) < s.width).double(),
                                    s.width)
    return base, masks


def _head_units(table: Any, heads: int, head_dim: int) -> dict[int, int]:
    """Zero units to add: `heads` to every heads space, `head_dim` to every head dim that
    moves head by head; 0 to the others (attention keeps its number and width of heads)."""
    out: dict[int, int] = {}
    for h, ks in table.heads.items():
        out[h] = 0 if table[h].frozen else heads
        for _, d in ks:
            out[d] = 0 if table[d].frozen or d in table.shared_dims else head_dim
    return out


def _check_size(model: nn.Module, table: Any, added: dict[int, int], extra: float) -> None:
    """Refuse before allocating when the widened parameters (counting only the spaces widened
    directly: a lower bound) would not fit in the memory this machine has free."""
    named = named_tensors(model)
    need = 0
    for name, dims in table.param_axes.items():
        t = named[name]
        grow = 1.0
        for sid in dims.values():
            if sid in added:
                grow *= 1 + added[sid] / table[sid].width
        need += t.numel() * t.element_size() * grow
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no bound known
        return
    if need > free:
        raise ConfigError(f"widening by extra={extra!r} would need at least "
                          f"{need / 2**30:.3g} GiB of parameters, more than the "
                          f"{free / 2**30:.1f} GiB of memory free; choose a smaller extra")

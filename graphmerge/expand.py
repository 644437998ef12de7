"""Function-preserving growth of a model: wider spaces made of duplicated units.

`widen(model, inputs, extra=0.5)` adds units to every free space by duplicating existing ones:
producers (`out` axes) copy the unit, consumers (`in` axes) share its weight among the copies,
so the wider model computes the same function. Used to test heterogeneous-width merging
(a narrow model merged with a widened copy of itself must give back its function).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .compile import set_tensor, sync_module_attributes
from .errors import ConfigError, GraphmergeError
from .oracle import _combine
from .spaces import SpaceTable
from .trace import as_inputs, trace

__all__ = ["widen"]

_NORMALISING = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _normalised_spaces(model: nn.Module, table: SpaceTable) -> set[int]:
    """Spaces normalised over their own axis: duplicating units would change the statistics."""
    owners = {name: m for name, m in model.named_modules()}
    out = set()
    for s in table:
        for a in s.params:
            if isinstance(owners.get(a.param.rpartition(".")[0]), _NORMALISING):
                out.add(s.id)
    return out


def widen(model: nn.Module, example_inputs: Any, extra: float | int = 0.5, seed: int = 0,
          rtol: float = 1e-4) -> nn.Module:
    """A copy of `model` whose free spaces are wider by `extra` (a ratio, or a number of units)
    and that computes the same function (checked on the example inputs).

    Spaces normalised over their own axis (LayerNorm) keep their width.
    """
    if isinstance(extra, bool) or not isinstance(extra, (int, float)) or extra < 0:
        raise ConfigError(f"extra must be a non-negative ratio or number of units, got {extra!r}")
    inputs = as_inputs(example_inputs)
    table = trace(model, inputs).space_table
    skip = _normalised_spaces(model, table)
    g = torch.Generator().manual_seed(seed)
    index: dict[int, torch.Tensor] = {}
    share: dict[int, torch.Tensor] = {}  # per unit of the wide space: 1 / number of copies
    for s in table:
        if s.derived is not None:
            continue
        n_extra = 0 if s.frozen or s.id in skip else (
            extra if isinstance(extra, int) else round(extra * s.width))
        src = torch.randint(0, s.width, (n_extra,), generator=g)
        index[s.id] = torch.cat([torch.arange(s.width), src])
        copies = torch.bincount(index[s.id], minlength=s.width).double()
        share[s.id] = 1.0 / copies[index[s.id]]

    def get(i: int | None, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i is None:
            return torch.arange(width), torch.ones(width, dtype=torch.float64)
        if i not in index:
            d = table[i].derived
            parts = [get(p, w) for p, w in zip(d.parts, d.sizes)]
            index[i] = _combine(d.kind, [p[0] for p in parts], d.sizes)
            if d.kind == "cat":
                share[i] = torch.cat([p[1] for p in parts])
            else:
                sc = torch.ones(1, dtype=torch.float64)
                for _, w in parts:
                    sc = (sc[:, None] * w[None, :]).reshape(-1)
                share[i] = sc
        return index[i], share[i]

    for s in table:
        get(s.id, s.width)
    roles = {(a.param, a.dim): a.role for s in table for a in s.params}
    wide = copy.deepcopy(model)
    named = dict(wide.named_parameters(remove_duplicate=False))
    named.update(wide.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, dims in table.param_axes.items():
            t = named[name].detach()
            for dim, sid in dims.items():
                t = t.index_select(dim, index[sid])
                if roles.get((name, dim)) == "in" and t.is_floating_point():
                    shape = [1] * t.dim()
                    shape[dim] = -1
                    t = t * share[sid].to(t.dtype).reshape(shape)
            set_tensor(wide, name, t.contiguous())
    sync_module_attributes(wide)
    wide.eval()
    with torch.no_grad():
        a, b = model.eval()(*inputs), wide(*inputs)
    err = float((a - b).norm() / a.norm().clamp_min(1e-12))
    if err > rtol:
        raise GraphmergeError(f"widening changed the model's outputs (relative error {err:.1e}); "
                              f"a space is normalised in a way widen() does not detect")
    return wide

"""An orthogonal reparametrisation of one space: every activation on its axis becomes xQ, and
every parameter axis in it (weight rows and columns, biases, additive parameters, embedding
tables) is contracted with Qᵀ, so the model computes the same function
(`graph.rotatable` says where that holds)."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from graphmerge.graph.spaces import SpaceTable
from graphmerge.graph.tensors import named_tensors

__all__ = ["rotate_space"]


@torch.no_grad()
def rotate_space(module: nn.Module, table: SpaceTable, sid: int, q: torch.Tensor,
                 skip: Collection[str] = ()) -> list[str]:
    """Rotate space `sid` of `module` by orthogonal q [d, d] (x → xq), in place (the caller owns
    the tensors); parameters named in `skip` (folded norms: 1 and 0) are left alone. Computed
    in float64 on each tensor's device, written back in its dtype. Returns the names rotated."""
    named = named_tensors(module)
    done = []
    for name, axes in table.param_axes.items():
        dims = [d for d, s in axes.items() if s == sid]
        if not dims or name in skip or name not in named:
            continue
        t = named[name]
        if not t.is_floating_point():
            continue
        value = t.detach().double()
        qt = q.to(device=t.device, dtype=torch.float64).T
        for d in dims:
            value = torch.tensordot(qt, value, dims=([1], [d])).movedim(0, d)
        t.copy_(value.to(t.dtype))
        done.append(name)
    return done

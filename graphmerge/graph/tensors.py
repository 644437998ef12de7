"""Tensor edits shared by every rewrite: read all parameters and buffers by name, replace one,
and make module attributes agree with their new weights' shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["named_tensors", "canonical_names", "get_tensor", "set_tensor", "take", "resize_axes",
           "sync_module_attributes"]


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by qualified name; a tensor shared under several
    names (tied weights) appears under each of them."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Name -> the first name of the same tensor: tied weights (one tensor under several names,
    e.g. an LM head tied to the embedding) share one canonical name."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in named_tensors(module).items()}


def get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    """Parameter, buffer or tensor attribute `name` (qualified) of `root`."""
    owner, _, leaf = name.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, leaf)


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter, buffer or tensor attribute `name` (qualified) of `root`; every other
    name of the same tensor (tied weights) gets the same new tensor, so they stay tied."""
    named = named_tensors(root)
    old = named.get(name)
    names = [n for n, t in named.items() if t is old] if old is not None else [name]
    new: torch.Tensor | None = None
    for n in names:
        owner_name, _, leaf = n.rpartition(".")
        owner = root.get_submodule(owner_name) if owner_name else root
        if leaf in owner._parameters:
            if new is None:
                new = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
            owner._parameters[leaf] = new
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            setattr(owner, leaf, value)


def take(t: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """`t.index_select(dim, index)` as a gather (on a CPU several times faster off axis 0)."""
    shape = list(t.shape)
    shape[dim] = len(index)
    view = [1] * t.dim()
    view[dim] = -1
    return t.gather(dim, index.to(t.device).view(view).expand(shape))


def resize_axes(t: torch.Tensor, dims: dict[int, int], widths: dict[int, int]) -> torch.Tensor:
    """A copy of `t` cut or tiled along every axis `dim` whose space `dims[dim]` has a width in
    `widths` other than its size (the values are placeholders: callers zero or overwrite them)."""
    out = t.detach()
    for dim, sid in dims.items():
        new = widths.get(sid, out.shape[dim])
        if out.shape[dim] != new:
            out = out.index_select(dim, torch.arange(new, device=out.device) % out.shape[dim])
    return out.clone()


def sync_module_attributes(root: nn.Module, groups: Mapping[str, int] | None = None) -> None:
    """Make module attributes (in/out features, channels, groups, norm sizes) agree with the
    shapes of their new weights. `groups`: the new number of groups of grouped modules, by
    path (`graphmerge.graph.literals.module_groups`); a grouped module not named keeps the
    number of units of one group."""
    groups = groups or {}
    for path, m in root.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            a, b = m.weight.shape[:2]
            out_c, in_per_group = (b * m.groups, a) if transposed else (a, b)
            if depthwise:
                m.groups = out_c
            elif path in groups:
                m.groups = groups[path]
            elif m.groups > 1:  # grouped: the units of one group keep their number
                m.groups = a // ((m.in_channels if transposed else m.out_channels) // m.groups)
            m.out_channels = out_c
            m.in_channels = in_per_group * m.groups if not transposed else a
        elif isinstance(m, nn.modules.batchnorm._NormBase) and w is not None:
            m.num_features = w.shape[0]
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.num_features = m.running_mean.shape[0]
        elif isinstance(m, nn.GroupNorm) and w is not None:  # whole groups were merged
            m.num_groups = groups.get(path, w.shape[0] // (m.num_channels // m.num_groups))
            m.num_channels = w.shape[0]
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
            m.normalized_shape = tuple(w.shape)
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape

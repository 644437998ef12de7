"""Build the merged `torch.fx.GraphModule`: model 0's graph carrying the merged tensors.

The module is a deep copy, so it runs on its own: nothing refers back to the input models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import GraphmergeError
from .passes.context import MergeContext
from .trace import as_inputs

__all__ = ["compile_merged", "set_tensor", "sync_module_attributes"]


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter, buffer or tensor attribute `name` (qualified) of `root`."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, value)


def sync_module_attributes(root: nn.Module) -> None:
    """Make module attributes (in/out features, channels, groups, norm sizes) agree with the
    shapes of their new weights."""
    for m in root.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
            a, b = m.weight.shape[:2]
            out_c, in_per_group = (b * m.groups, a) if transposed else (a, b)
            m.out_channels = out_c
            if depthwise:
                m.groups = out_c
            m.in_channels = in_per_group * m.groups if not transposed else a
        elif isinstance(m, nn.modules.batchnorm._NormBase) and w is not None:
            m.num_features = w.shape[0]
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
            m.num_features = m.running_mean.shape[0]
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
            m.normalized_shape = tuple(w.shape)
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape


def compile_merged(ctx: MergeContext, example_inputs: Any) -> MergeContext:
    """Copy model 0's graph module, load the merged tensors, check it runs and is finite."""
    ctx.require("compile_merged", merged_state="merge_parameters")
    gm: fx.GraphModule = copy.deepcopy(ctx.traced[0].graph_module)
    with torch.no_grad():
        for name, value in ctx.merged_state.items():
            set_tensor(gm, name, value.contiguous())
    sync_module_attributes(gm)
    gm.recompile()
    gm.eval()
    bad = [n for n, p in gm.state_dict().items() if p.is_floating_point() and not torch.isfinite(
        p).all()]
    if bad:
        raise GraphmergeError(f"merged parameters are not finite: {bad[:5]}")
    try:
        with torch.no_grad():
            out = gm(*as_inputs(example_inputs))
    except Exception as e:
        raise GraphmergeError(
            f"the merged module does not run on the example inputs: {type(e).__name__}: {e}"
        ) from e
    outs = out if isinstance(out, (tuple, list)) else [out]
    if any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
           for o in outs):
        raise GraphmergeError("the merged module produces NaN/inf on the example inputs")
    ctx.module = gm
    return ctx

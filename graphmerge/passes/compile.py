"""Pass `compile_merged`: one `torch.fx.GraphModule`, model 0's graph carrying the merged
tensors.

The module is a deep copy, so it runs on its own: nothing refers back to the input models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphmerge.errors import GraphmergeError, summarize
from graphmerge.graph.capture import set_eval
from graphmerge.graph.literals import (find_literals, merged_widths, module_groups,
                                       resize_literals)
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass
from graphmerge.graph.tensors import named_tensors, sync_module_attributes

__all__ = ["compile_merged"]


@merge_pass(needs=("merged_state",), provides=("module",))
def compile_merged(ctx: MergeContext) -> None:
    """Copy model 0's graph module with the merged tensors in place of its own (they are not
    copied first: a model's worth of memory), resize module attributes and shape literals to
    the merged widths, check it runs and is finite."""
    source = ctx.traced[0].graph_module
    named = named_tensors(source)
    memo: dict[int, Any] = {}
    for name, value in ctx.merged_state.items():
        old = named[name]
        memo[id(old)] = (nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
                         if isinstance(old, nn.Parameter) else value.contiguous())
    gm: fx.GraphModule = copy.deepcopy(source, memo)  # every name of a tensor: its merged one
    table = ctx.traced[0].space_table  # widths held as literals follow their spaces
    widths = merged_widths(table, {sid: plan.width for sid, plan in ctx.plans.items()})
    sync_module_attributes(gm, module_groups(ctx.traced[0], widths))
    resize_literals(gm, find_literals(ctx.traced[0]), widths)
    gm.recompile()
    set_eval(gm)
    bad = [n for n, p in gm.state_dict().items() if p.is_floating_point() and not torch.isfinite(
        p).all()]
    if bad:
        raise GraphmergeError(f"merged parameters are not finite: {bad[:5]}")
    try:
        with torch.no_grad():
            out = gm(*ctx.example_inputs)
    except Exception as e:
        raise GraphmergeError(
            f"the merged module does not run on the example inputs: {summarize(e)}"
        ) from e
    outs = out if isinstance(out, (tuple, list)) else [out]
    if any(isinstance(o, torch.Tensor) and o.is_floating_point() and not torch.isfinite(o).all()
           for o in outs):
        raise GraphmergeError("the merged module produces NaN/inf on the example inputs")
    ctx.module = gm

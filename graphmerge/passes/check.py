"""Pass `check_spaces`: the permutation oracle on model 0, before any merge work.

A model whose space table breaks its function under a random permutation is refused with the
op that broke it (`SpaceCheckError`), never merged silently wrong.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from graphmerge.graph.oracle import check_spaces as run_oracle
from graphmerge.graph.oracle import to_double
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(needs=("traced",), provides=("checked",))
def check_spaces(ctx: MergeContext) -> None:
    """One float64 oracle trial on model 0 (skipped with `check=False`). An fx graph is
    checked as traced, on a float64 copy; an exported graph has the dtype baked into its ops
    and is captured again from a float64 copy of the model."""
    if not ctx.config.check:
        pass
    elif ctx.traced[0].frontend == "fx":
        copy64 = to_double(copy.deepcopy(ctx.traced[0].graph_module))
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in ctx.example_inputs)
        run_oracle(None, inputs, trials=1, traced=replace(ctx.traced[0], graph_module=copy64))
    else:
        run_oracle(ctx.models[0], ctx.example_inputs, trials=1,
                   leaf_modules=ctx.config.leaf_modules, frontend=ctx.config.frontend)
    ctx.checked = ctx.config.check

"""Pass `check_spaces`: the permutation oracle on model 0, before any merge work.

A model whose space table breaks its function under a random permutation is refused with the
op that broke it (`SpaceCheckError`), never merged silently wrong.
"""

from __future__ import annotations

from graphmerge.graph.oracle import check_spaces as run_oracle
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(needs=("traced",), provides=("checked",))
def check_spaces(ctx: MergeContext) -> None:
    """One float64 oracle trial on model 0 (skipped with `check=False`)."""
    if ctx.config.check:
        run_oracle(ctx.models[0], ctx.example_inputs, trials=1,
                   leaf_modules=ctx.config.leaf_modules, frontend=ctx.config.frontend)
    ctx.checked = ctx.config.check

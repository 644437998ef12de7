"""Pass `check_spaces`: the permutation oracle on model 0, before any merge work.

A model whose space table breaks its function under a random permutation is refused with the
op that broke it (`SpaceCheckError`), never merged silently wrong.

The oracle runs on the first `ORACLE_SAMPLES` samples of the example batch: it compares every
node of the graph, so a wrong rule shows on any batch, and a small one costs a fraction of the
float64 runs and of the values kept. A model that cannot run on fewer samples, or that the
oracle refuses on them, is checked again on the whole batch, whose verdict stands.

A float32 or float64 model is first checked as captured, in its own precision, against
`SCREEN_RTOL` (float32 rounding moves a correct rule's nodes by ~1e-6, a wrong rule by O(1)):
no float64 copy and no second capture. Where that screen fails, and for models of lower
precision, the float64 oracle runs, and its verdict stands.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from graphmerge.calibration import first_samples
from graphmerge.errors import SpaceCheckError
from graphmerge.graph.memory import give_back
from graphmerge.graph.oracle import check_spaces as run_oracle
from graphmerge.graph.oracle import double_copy
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

log = logging.getLogger(__name__)

#: samples of the example batch the oracle runs on first (the batch itself when smaller)
ORACLE_SAMPLES = 2

#: the relative error per node that the screen in the model's own precision accepts
SCREEN_RTOL = 1e-3


@merge_pass(needs=("traced",), provides=("checked",))
def check_spaces(ctx: MergeContext) -> None:
    """One oracle trial on model 0 (skipped with `check=False`)."""
    if ctx.config.check:
        few = first_samples(ctx.example_inputs, ORACLE_SAMPLES)
        try:
            _oracle(ctx, few)
        except Exception as exc:  # noqa: BLE001 - judged again on the whole batch below
            if few is ctx.example_inputs:
                raise
            log.debug("the oracle on %d samples failed (%s: %s); checking the whole batch",
                      ORACLE_SAMPLES, type(exc).__name__, exc)
            _oracle(ctx, ctx.example_inputs)
        give_back(ctx.models)  # the oracle's copy and its values, before the statistics
    ctx.checked = ctx.config.check


def _oracle(ctx: MergeContext, inputs: tuple[Any, ...]) -> None:
    """The trial on `inputs`: the screen (module docstring), then, where it fails, the float64
    oracle."""
    gm = ctx.traced[0].graph_module
    if all(t.dtype in (torch.float32, torch.float64)
           for t in (*gm.parameters(), *gm.buffers()) if t.is_floating_point()):
        try:
            run_oracle(None, inputs, trials=1, rtol=SCREEN_RTOL, traced=ctx.traced[0])
            return
        except SpaceCheckError as exc:
            log.debug("the oracle in the model's precision failed (%s); checking in float64",
                      exc)
    _oracle64(ctx, inputs)


def _oracle64(ctx: MergeContext, inputs: tuple[Any, ...]) -> None:
    """The float64 trial on `inputs`. An fx graph is checked as traced, on a float64 copy
    (permuted in place: the oracle owns it); an exported graph has the dtype baked into its
    ops and is captured again from a float64 copy of the model."""
    if ctx.traced[0].frontend == "fx":
        copy64 = double_copy(ctx.traced[0].graph_module)
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point()
                       else x for x in inputs)
        run_oracle(None, inputs, trials=1, traced=replace(ctx.traced[0], graph_module=copy64),
                   own=True)
    else:
        frontend = "export" if ctx.traced[0].frontend == "export" else ctx.config.frontend
        run_oracle(ctx.models[0], inputs, trials=1, leaf_modules=ctx.config.leaf_modules,
                   frontend=frontend)

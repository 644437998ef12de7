"""Pass `correct_norms`: recompute BatchNorm running statistics of the merged module on the
calibration data (`norms="reset"`, as ZipIt and HET do)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from graphmerge.graph.capture import set_eval
from graphmerge.inputs import split_batch
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


def reset_batch_norms(module: nn.Module, batches: Iterable[Any], n_inputs: int,
                progress: bool = True) -> int:
    """Cumulative-average BatchNorm statistics over `batches`; returns the number of norms reset.

    Only the norms run in train mode; everything else (dropout) stays in eval mode.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return 0
    set_eval(module)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    with torch.no_grad():
        for batch in tqdm(batches, desc="reset norms", unit="batch", disable=not progress,
                          leave=False):
            module(*split_batch(batch, n_inputs))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    set_eval(module)
    return len(norms)


@merge_pass(needs=("module",), provides=("norms_done",))
def correct_norms(ctx: MergeContext) -> None:
    """Apply the configured norm correction to the merged module."""
    if ctx.config.norms == "reset":
        reset_batch_norms(ctx.module, ctx.batches, ctx.n_inputs, progress=ctx.config.progress)
    ctx.norms_done = ctx.config.norms

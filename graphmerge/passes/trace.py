"""Pass `trace_models`: capture every model as an fx graph and find its spaces."""

from __future__ import annotations

import logging

from graphmerge.errors import TracingError
from graphmerge.graph.analyse import trace
from graphmerge.match.pairing import unaligned_owners
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass

log = logging.getLogger(__name__)


@merge_pass(provides=("traced",))
def trace_models(ctx: MergeContext) -> None:
    """Trace each model on the example inputs; the graphs share the models' parameters.

    With frontend "auto", where torch.fx leaves a module one opaque call (such as
    nn.MultiheadAttention) whose widths differ between the models, every model is captured
    again with torch.export, which records the ops inside it (one line in the log says so)."""
    cfg = ctx.config

    def capture(frontend: str) -> list:
        return [trace(m, ctx.example_inputs, frontend=frontend, leaf_modules=cfg.leaf_modules)
                for m in ctx.models]

    ctx.traced = capture(cfg.frontend)
    if cfg.frontend != "auto" or len(ctx.traced) < 2 or \
            any(t.frontend != "fx" for t in ctx.traced):
        return
    calls = {n.target for n in ctx.traced[0].graph.nodes if n.op == "call_module"}
    opaque = [o for o in unaligned_owners(ctx.traced) if o in calls]
    if not opaque:
        return
    try:
        exported = capture("export")
    except TracingError as e:  # keep fx's graphs: pairing names the opaque module
        log.info("torch.export could not capture the models either (%s)", e)
        return
    if unaligned_owners(exported):  # the ops inside leave it unaligned too (a kernel size)
        return
    log.info("%s: one opaque call under torch.fx, with widths that differ between the "
             "models; every model captured with torch.export instead", ", ".join(
                 f"`{o}`" for o in opaque))
    ctx.traced = exported

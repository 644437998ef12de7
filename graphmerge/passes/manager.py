"""A small pass manager: each merge step is a `Pass` that declares the context fields it needs
and provides; `run_passes` runs an ordered list, times each pass, and checks both sides.

Calling a pass before the ones it depends on raises `PassOrderError` naming the missing pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from graphmerge.errors import GraphmergeError
from graphmerge.passes.context import MergeContext

__all__ = ["Pass", "PassOrderError", "merge_pass", "run_passes", "PROVIDERS"]

log = logging.getLogger(__name__)

#: context field -> name of the pass that provides it (filled by `merge_pass`)
PROVIDERS: dict[str, str] = {}


class PassOrderError(GraphmergeError):
    """A pass was run before a pass it depends on."""


@dataclass(frozen=True)
class Pass:
    """One merge step: `run(ctx)` reads the fields in `needs` and sets those in `provides`."""

    name: str
    run: Callable[[MergeContext], None]
    needs: tuple[str, ...]
    provides: tuple[str, ...]

    def __call__(self, ctx: MergeContext) -> MergeContext:
        missing = [f for f in self.needs if getattr(ctx, f) is None]
        if missing:
            raise PassOrderError(
                f"pass {self.name} needs {', '.join(f'`{f}`' for f in missing)}: run "
                f"{', '.join(dict.fromkeys(PROVIDERS.get(f, '?') for f in missing))} first")
        t0 = time.perf_counter()
        self.run(ctx)
        ctx.seconds[self.name] = ctx.seconds.get(self.name, 0.0) + time.perf_counter() - t0
        unset = [f for f in self.provides if getattr(ctx, f) is None]
        if unset:
            raise GraphmergeError(f"pass {self.name} did not provide {unset}")
        log.debug("pass %s: %.2fs", self.name, ctx.seconds[self.name])
        return ctx


def merge_pass(needs: Sequence[str] = (), provides: Sequence[str] = ()
               ) -> Callable[[Callable[[MergeContext], None]], Pass]:
    """Declare a function `f(ctx)` as a pass (its name is the function's)."""

    def wrap(fn: Callable[[MergeContext], None]) -> Pass:
        p = Pass(fn.__name__, fn, tuple(needs), tuple(provides))
        for f in p.provides:
            PROVIDERS.setdefault(f, p.name)
        return p

    return wrap


def run_passes(ctx: MergeContext, passes: Sequence[Pass]) -> MergeContext:
    """Run `passes` in order on `ctx`."""
    for p in passes:
        p(ctx)
    return ctx

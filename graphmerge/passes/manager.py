"""A small pass manager: each merge step is a `Pass` that declares the context fields it needs,
provides and otherwise writes; `run_passes` runs an ordered list, times each pass, and checks
every side.

Calling a pass before the ones it depends on raises `PassOrderError` naming the missing pass; a
pass that replaces a context field (or adds to or replaces an item of a list or dict field)
that it did not declare raises `PassDeclarationError` naming the field.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graphmerge.errors import GraphmergeError
from graphmerge.passes.context import MergeContext

__all__ = ["Pass", "PassOrderError", "PassDeclarationError", "merge_pass", "run_passes",
           "PROVIDERS"]

log = logging.getLogger(__name__)

#: context field -> name of the pass that provides it (filled by `merge_pass`)
PROVIDERS: dict[str, str] = {}


class PassOrderError(GraphmergeError):
    """A pass was run before a pass it depends on."""


class PassDeclarationError(GraphmergeError):
    """A pass wrote a context field it did not declare (a bug in the pass, not in the input)."""


#: fields every pass may touch: the manager's own timing record
_UNCHECKED = ("seconds",)


def _fingerprint(value: Any) -> Any:
    """What changes when a field is replaced, or an item of a list or dict field is added,
    removed or replaced: identities, not values (cheap for any size)."""
    if isinstance(value, dict):
        return id(value), tuple((k, id(v)) for k, v in value.items())
    if isinstance(value, list):
        return id(value), tuple(map(id, value))
    return id(value)


def _snapshot(ctx: MergeContext) -> dict[str, Any]:
    return {f.name: _fingerprint(getattr(ctx, f.name)) for f in dataclasses.fields(ctx)
            if f.name not in _UNCHECKED}


@dataclass(frozen=True)
class Pass:
    """One merge step: `run(ctx)` reads the fields in `needs`, sets those in `provides`, and
    may replace or add to those in `writes` (fields another pass provides); any other write is
    refused."""

    name: str
    run: Callable[[MergeContext], None]
    needs: tuple[str, ...]
    provides: tuple[str, ...]
    writes: tuple[str, ...] = ()

    def __call__(self, ctx: MergeContext) -> MergeContext:
        missing = [f for f in self.needs if getattr(ctx, f) is None]
        if missing:
            raise PassOrderError(
                f"pass {self.name} needs {', '.join(f'`{f}`' for f in missing)}: run "
                f"{', '.join(dict.fromkeys(PROVIDERS.get(f, '?') for f in missing))} first")
        before = _snapshot(ctx)
        t0 = time.perf_counter()
        self.run(ctx)
        ctx.seconds[self.name] = ctx.seconds.get(self.name, 0.0) + time.perf_counter() - t0
        unset = [f for f in self.provides if getattr(ctx, f) is None]
        if unset:
            raise GraphmergeError(f"pass {self.name} did not provide {unset}")
        allowed = {*self.provides, *self.writes}
        undeclared = [f for f, v in _snapshot(ctx).items() if v != before[f] and f not in allowed]
        if undeclared:
            raise PassDeclarationError(
                f"pass {self.name} wrote {', '.join(f'`{f}`' for f in undeclared)} without "
                f"declaring {'it' if len(undeclared) == 1 else 'them'}: add "
                f"{'it' if len(undeclared) == 1 else 'them'} to the pass's provides= or writes=")
        log.debug("pass %s: %.2fs", self.name, ctx.seconds[self.name])
        return ctx


def merge_pass(needs: Sequence[str] = (), provides: Sequence[str] = (),
               writes: Sequence[str] = ()) -> Callable[[Callable[[MergeContext], None]], Pass]:
    """Declare a function `f(ctx)` as a pass (its name is the function's): the context fields
    it `needs` set, those it `provides`, and those it also `writes` (replaces or adds to)."""

    def wrap(fn: Callable[[MergeContext], None]) -> Pass:
        p = Pass(fn.__name__, fn, tuple(needs), tuple(provides), tuple(writes))
        for f in p.provides:
            PROVIDERS.setdefault(f, p.name)
        return p

    return wrap


def run_passes(ctx: MergeContext, passes: Sequence[Pass]) -> MergeContext:
    """Run `passes` in order on `ctx`."""
    for p in passes:
        p(ctx)
    return ctx

"""How much of a model a merge aligns: the parameters that a merge transforms before it
averages them, against those it averages as they are (their spaces keep the identity).

A merge where every space is frozen is a plain weight average; `coverage` says so in numbers,
and says which frozen spaces (by their `Frozen` reasons) cost the most parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field

from torch import nn

from graphmerge.errors import CoverageError, LowCoverageWarning
from graphmerge.graph.spaces import FrozenBy, SpaceTable
from graphmerge.graph.tensors import canonical_names
from graphmerge.match.plans import transformed_spaces
from graphmerge.match.selection import head_projections, mergeable

__all__ = ["Coverage", "CoverageReason", "coverage", "planned_spaces",
           "check_coverage", "share", "LOW_COVERAGE"]

#: below this fraction of aligned parameters a merge warns (`LowCoverageWarning`)
LOW_COVERAGE = 0.5

# reasons of axes that no merge could align: the model's own inputs and outputs
_INTERFACE = (FrozenBy.GRAPH_INPUT.name, FrozenBy.GRAPH_OUTPUT.name)
# kinds of reasons that are not a space's `FrozenBy`
UNMERGED = "UNMERGED"    # a free space that no plan merged
ATTENTION = "ATTENTION"  # heads, head dims or projections kept in place (attention="frozen")
UNSEEN = "UNSEEN"        # no axis in any space (a module without a rule, or kept as it is)
SCALAR = "SCALAR"        # a tensor with no axis


@dataclass(frozen=True)
class CoverageReason:
    """One reason that parameters kept the identity: `kind` (a `FrozenBy` name, or UNMERGED,
    ATTENTION, UNSEEN, SCALAR), `text` (its words, with the nodes where one op did it),
    `elements` (of the not-aligned tensors it is charged with) and those `tensors`."""

    kind: str
    text: str
    elements: int
    tensors: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"kind": self.kind, "text": self.text, "elements": self.elements,
                "tensors": list(self.tensors)}


@dataclass(frozen=True)
class Coverage:
    """How many parameter elements a merge aligned.

    A parameter (floating `nn.Parameter`s only: buffers such as running statistics follow
    their layer; a tied tensor counted once, under its canonical name) is **aligned** when at
    least one of its axes lies in a space that the merge transforms: a free base space with a
    plan (`SpacePlan`), an attention heads space or head projection merged as heads, or a
    derived space (cat, kron) with a merged part. Its other axes may keep the identity: the
    first conv, whose input channels are the model's input, and the classifier, whose rows
    are the logits, are aligned through their merged axis. A parameter none of whose axes is
    merged is averaged as it is, unit i with unit i.

    Each not-aligned parameter is charged to one reason, read from its axes in dim order: the
    first space's `Frozen` reason (or ATTENTION: heads kept in place; UNMERGED: a free space
    without a plan) other than touching the graph's inputs or outputs, else that interface;
    a parameter with no axis in any space is UNSEEN (the axis rules link it to nothing: a
    module without a rule, or a rule that keeps it as it is), or SCALAR (no axis at all).
    `reasons` ranks them by elements, reasons of one kind and text (one op at several nodes)
    counted together.

    Attributes:
        aligned: parameter elements with a merged axis.
        total: all parameter elements.
        reasons: why the other `total - aligned` elements kept the identity, largest first.
    """

    aligned: int
    total: int
    reasons: tuple[CoverageReason, ...] = field(default_factory=tuple)

    @property
    def fraction(self) -> float:
        """aligned / total (1.0 for a model without parameters: nothing kept the identity)."""
        return self.aligned / self.total if self.total else 1.0

    def top(self, n: int = 3) -> str:
        """The first `n` reasons with their share of all parameters, in one line."""
        shown = [f"{share(r.elements / self.total)} ({r.text})" for r in self.reasons[:n]]
        more = len(self.reasons) - len(shown)
        return "; ".join(shown) + (f"; {more} more" if more > 0 else "")

    def format(self) -> str:
        """One line: "aligned 93.1% of parameters (1,234 of 1,326); kept at the identity:
        4.2% (reason), ..."."""
        line = (f"aligned {share(self.fraction)} of parameters ({self.aligned:,} of "
                f"{self.total:,})")
        return line + (f"; kept at the identity: {self.top()}" if self.reasons else "")

    def as_dict(self) -> dict:
        """For result.json."""
        return {"aligned": self.aligned, "total": self.total, "fraction": self.fraction,
                "reasons": [r.as_dict() for r in self.reasons]}


def share(x: float) -> str:
    """A fraction as a percentage that never rounds to 0% or 100% unless it is exactly that:
    0.93114 -> "93.1%", 0.99996 -> ">99.9%", 4e-5 -> "<0.1%"."""
    if 0 < x < 0.001:
        return "<0.1%"
    if 0.999 < x < 1:
        return ">99.9%"
    return f"{x:.1%}"


def planned_spaces(table: SpaceTable, attention: str = "heads") -> set[int]:
    """The base spaces a merge of models with this table plans before its heads option: the
    free base spaces merged on their own, and attention heads with their projections
    (`graphmerge.match.selection`). What `coverage` reads when no plans are given."""
    out = {s.id for s in mergeable(table)}
    for h, by_dim in head_projections(table, attention).items():
        out.add(h)
        out.update(k for krons in by_dim.values() for k in krons)
    return out


def coverage(table: SpaceTable, module: nn.Module, merged: Collection[int] | None = None,
             attention: str = "heads") -> Coverage:
    """The `Coverage` of a merge of models with `table` (model 0's space table) and `module`
    (a module whose parameter names the table uses, e.g. the traced GraphModule).

    Args:
        table: the space table.
        module: holds the parameters counted.
        merged: ids of the spaces that got a plan; None: those a merge would plan
            (`planned_spaces`; `graphmerge inspect` reads a self-merge this way).
        attention: the merge's attention option (read only when `merged` is None).
    """
    aligned = transformed_spaces(table, planned_spaces(table, attention) if merged is None
                             else merged)
    canonical = canonical_names(module)
    seen: set[str] = set()
    done, total = 0, 0
    charged: dict[tuple[str, str], tuple[set[str], list[str], int]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        name = canonical.get(name, name)
        if name in seen or not p.is_floating_point():
            continue
        seen.add(name)
        total += p.numel()
        dims = table.param_axes.get(name, {})
        if any(sid in aligned for sid in dims.values()):
            done += p.numel()
            continue
        kind, text, node = _reason(table, p.dim(), dims)
        nodes, tensors, n = charged.get((kind, text), (set(), [], 0))
        if node:
            nodes.add(node)
        charged[(kind, text)] = (nodes, [*tensors, name], n + p.numel())
    reasons = [CoverageReason(kind, text + _where(nodes), n, tuple(tensors))
               for (kind, text), (nodes, tensors, n) in charged.items()]
    reasons.sort(key=lambda r: (-r.elements, r.text))
    return Coverage(done, total, tuple(reasons))


def check_coverage(cov: Coverage, min_coverage: float | None = None,
                   stacklevel: int = 2) -> None:
    """Refuse a coverage below `min_coverage` (CoverageError), else warn in one line
    (`LowCoverageWarning`) below `LOW_COVERAGE`; nothing aligned: "a plain weight average"."""
    if min_coverage is not None and cov.fraction < min_coverage:
        raise CoverageError(
            f"the merge would align only {share(cov.fraction)} of the parameters ({cov.aligned:,} "
            f"of {cov.total:,}), below min_coverage={min_coverage}; kept at the identity: "
            f"{cov.top()}. `graphmerge inspect` lists the frozen spaces; register axis rules "
            f"for ops without one (graphmerge.graph.rules.register), or lower min_coverage")
    if cov.total == 0 or cov.fraction >= LOW_COVERAGE:
        return
    if cov.aligned == 0:
        head = (f"no parameter was aligned: the result is a plain weight average of the "
                f"models ({cov.total:,} parameters)")
    else:
        head = (f"only {share(cov.fraction)} of the parameters were aligned ({cov.aligned:,} of "
                f"{cov.total:,}); the rest are averaged unit by unit as they are")
    warnings.warn(f"{head}; kept at the identity: {cov.top()} (see `graphmerge inspect`; "
                  f"min_coverage= refuses such merges)", LowCoverageWarning,
                  stacklevel=stacklevel + 1)


def _reason(table: SpaceTable, ndim: int, dims: dict[int, int]
            ) -> tuple[str, str, str | None]:
    """(kind, text, node) of a not-aligned parameter: see `Coverage`."""
    if ndim == 0:
        return SCALAR, "a scalar (no axis)", None
    found = []
    attention = {sid for h, ks in table.heads.items() for kd in ks for sid in (h, *kd)}
    for dim in sorted(dims):
        space = table[dims[dim]]
        if space.frozen_by is not None:
            why = space.frozen_by
            found.append((why.by.name, why.detail or why.by.value, why.node))
        elif space.id in attention:
            found.append((ATTENTION, "attention heads, head dims or their projections kept in "
                                 "place (attention='frozen', or a head dim read alone)", None))
        else:
            found.append((UNMERGED, "a free space that was not merged", None))
    inner = [f for f in found if f[0] not in _INTERFACE]
    if inner or found:
        return (inner or found)[0]
    return UNSEEN, ("linked to no space by the axis rules (an op without a rule, or one "
                    "that keeps it as it is)"), None


def _where(nodes: set[str], shown: int = 3) -> str:
    """" (node `a`)" or " (nodes `a`, `b`, +2)"; "" for none."""
    if not nodes:
        return ""
    names = sorted(nodes)
    text = ", ".join(f"`{n}`" for n in names[:shown])
    more = f", +{len(names) - shown}" if len(names) > shown else ""
    return f" (node{'s' if len(names) > 1 else ''} {text}{more})"

"""Per-op axis rules: which axes of an op's inputs, outputs and parameters share one transform.

A rule receives an `Op` (the fx node, its module if any, concrete shapes) and yields links
(`graphmerge.graph.axes`). Every node axis of size > 1 that a rule does not mention is frozen, so
a forgotten axis can never produce a silently wrong merge. Ops without a rule freeze every axis
they touch, with one warning. Rules live in one registry keyed by module class, function object
or method name (`registry.py`); registering a key twice is an error. The rules themselves are
split by op family: `elementwise`, `layers`, `norms`, `shape`, `masks` (mask and position
ops), and `aten` (the aten ops of `torch.export` graphs, mostly aliases of the above);
`weight_path` gives a parameter transformed before use (weight standardisation) the roles of
the layer that reads it.
"""

from graphmerge.graph.rules import (  # noqa: F401  (each module registers its rules)
    aten,
    elementwise,
    layers,
    masks,
    norms,
    shape,
)
from graphmerge.graph.rules.registry import RULES, Op, RuleFn, register, rule_for

__all__ = ["RULES", "Op", "RuleFn", "register", "rule_for"]

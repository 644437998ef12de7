"""What the matching decides for each merged space (`SpacePlan`: per model a merge and an
unmerge matrix), and the per-model axis transforms of every space that the plans imply
(`SpaceTransforms`), read by the parameter merge and by the partial merge's tails."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphmerge.errors import MismatchError
from graphmerge.graph.spaces import SpaceTable
from graphmerge.graph.transforms import MATRICES, compose

__all__ = ["SpacePlan", "SpaceTransforms", "transformed_spaces"]


@dataclass
class SpacePlan:
    """How one base space is merged: per model i, M_i [r, d_i] and U_i [d_i, r]."""

    space: int
    widths: list[int]
    width: int
    matcher: str
    merge: list[np.ndarray]
    unmerge: list[np.ndarray]
    mean_correlation: float = float("nan")
    correlations: list[float] = field(default_factory=list)  # per merged group of >= 2 units
    #: the groups of global unit indices M_i and U_i were built from (zip's), when known: their
    #: nonzeros without reading the dense matrices (`SpaceTransforms.entries`)
    groups: list[list[int]] | None = None

    def averaged(self, values: Sequence[np.ndarray]) -> np.ndarray:
        """Σ_i M_i v_i for per-model unit values v_i [d_i]: the merged units' averages, from the
        groups when kept (each M_i holds 1/|g| at its members of group g: the dense M_i,
        mostly zeros that never took memory, are not read)."""
        if self.groups is None:
            return sum(np.asarray(m) @ np.asarray(v) for m, v in zip(self.merge, values))
        flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
        sizes = np.array([len(g) for g in self.groups], dtype=np.int64)
        members = np.fromiter((u for g in self.groups for u in g), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return np.add.reduceat(flat[members], starts) / sizes


def transformed_spaces(table: SpaceTable, merged: Collection[int]) -> set[int]:
    """The spaces a merge transforms: `merged` (the planned base spaces) and every derived
    space with a transformed part."""
    base = set(merged)
    memo: dict[int, bool] = {}

    def transformed(sid: int, seen: frozenset[int]) -> bool:
        if sid not in memo:
            d = table[sid].derived
            memo[sid] = sid in base or (d is not None and any(
                p is not None and p not in seen and transformed(p, seen | {sid})
                for p in d.parts))
        return memo[sid]

    return {s.id for s in table if transformed(s.id, frozenset())}


class SpaceTransforms:
    """Per-model axis transforms [r, d_i] for every space, built on demand and cached:
    "avg" = M_i (averages), "sel" = U_iᵀ (selects).

    Args:
        tables: every model's space table (one topology).
        plans: the plans of the merged base spaces, by space id.
        n_models: how many models are merged (an unmerged space averages by 1/n_models).
    """

    def __init__(self, tables: Sequence[SpaceTable], plans: Mapping[int, SpacePlan],
                 n_models: int) -> None:
        self.tables: list[SpaceTable] = list(tables)
        self.plans = plans
        self.n_models = n_models
        self.cache: dict[tuple[int, int, bool], np.ndarray] = {}
        self._merged: set[int] | None = None

    def merged(self, sid: int) -> bool:
        """Whether the space (or some part of it) is merged by a plan."""
        if self._merged is None:
            self._merged = transformed_spaces(self.tables[0], self.plans)
        return sid in self._merged

    def get(self, i: int, sid: int, average: bool) -> np.ndarray:
        key = (i, sid, average)
        if key not in self.cache:
            self.cache[key] = compose(self.tables[i], sid,
                                      lambda s, primary: self._own(i, s, average and primary),
                                      MATRICES)
            rows = self.cache[key].shape[0]
            if i and rows != self.get(0, sid, average).shape[0]:
                raise MismatchError(
                    f"space {sid} ({self.tables[0][sid]}) merges to {rows} units for model "
                    f"{i} and {self.get(0, sid, average).shape[0]} for model 0: a part of it "
                    f"that keeps the identity differs in width between the models")
        return self.cache[key]

    def entries(self, i: int, sid: int, average: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The nonzeros (rows, columns, values; row-major) of `get(i, sid, average)` for a
        space whose plan keeps its groups: M_i holds 1/|g| and U_iᵀ holds 1 at (group g, each
        member of model i). None for any other space: read the matrix."""
        plan = self.plans.get(sid)
        if plan is None or plan.groups is None:
            return None
        off, width = sum(plan.widths[:i]), plan.widths[i]
        unit = np.fromiter((u for g in plan.groups for u in g), dtype=np.int64)
        sizes = np.array([len(g) for g in plan.groups], dtype=np.int64)
        row = np.repeat(np.arange(len(plan.groups)), sizes)
        own = (unit >= off) & (unit < off + width)
        value = 1.0 / sizes.astype(np.float64)[row[own]] if average else np.ones(int(own.sum()))
        return row[own], unit[own] - off, value

    def _own(self, i: int, sid: int, average: bool) -> np.ndarray | None:
        """A plan's matrix, the identity for a space that is not merged, None to compose."""
        plan = self.plans.get(sid)
        if plan is not None:
            return plan.merge[i] if average else plan.unmerge[i].T
        space = self.tables[i][sid]
        if space.derived is not None and self.merged(sid):
            return None
        widths = [t[sid].width for t in self.tables]
        if len(set(widths)) > 1:
            raise MismatchError(
                f"space {sid} keeps the identity ({space.why or 'it is not merged'}) but its "
                f"width differs between models: {widths}")
        eye = np.eye(space.width)
        return eye / self.n_models if average else eye

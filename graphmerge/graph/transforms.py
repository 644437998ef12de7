"""Transforms of derived spaces, composed from their parts: one walk for every representation.

A derived space is a concatenation (cat: block-diagonal transform) or a row-major product
(kron: Kronecker transform) of other spaces and of identity parts (`Derivation`). Every user
of transforms composes them here, with one of two algebras:

- `Selection` (index [r] into the d units, per-unit scale [r]): permutations (the oracle),
  duplications (`widen`); cheap at any width;
- dense matrices [r, d] (`MATRICES`): merge and unmerge matrices (the parameter rewrite).

In a Kronecker product only the *primary* part may average (the others select); `compose`
passes each part whether it is primary: cat parts inherit it, of kron parts only the first
transformable one keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from graphmerge.errors import GraphmergeError
from graphmerge.graph.spaces import SpaceTable

__all__ = ["Algebra", "Selection", "SELECTIONS", "MATRICES", "compose"]

T = TypeVar("T")


@dataclass(frozen=True)
class Algebra(Generic[T]):
    """How transforms of one representation are built: identity of a width, cat, kron."""

    identity: Callable[[int], T]
    cat: Callable[[list[T]], T]
    kron: Callable[[list[T]], T]


@dataclass(frozen=True)
class Selection:
    """Unit j of the new axis is `scale[j]` × unit `index[j]` of the old one (a sparse [r, d])."""

    index: torch.Tensor   # long [r]
    scale: torch.Tensor   # float64 [r]
    width: int            # d, the old width

    @staticmethod
    def of(index: torch.Tensor, width: int, scale: torch.Tensor | None = None) -> "Selection":
        return Selection(index, torch.ones(len(index), dtype=torch.float64)
                         if scale is None else scale, width)


def _cat_selections(parts: list[Selection]) -> Selection:
    offsets = np.cumsum([0] + [p.width for p in parts[:-1]])
    return Selection(torch.cat([p.index + int(o) for p, o in zip(parts, offsets)]),
                     torch.cat([p.scale for p in parts]), sum(p.width for p in parts))


def _kron_selections(parts: list[Selection]) -> Selection:
    index, scale, width = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64), 1
    for p in parts:
        index = (index[:, None] * p.width + p.index[None, :]).reshape(-1)
        scale = (scale[:, None] * p.scale[None, :]).reshape(-1)
        width *= p.width
    return Selection(index, scale, width)


def _block_diag(mats: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((sum(m.shape[0] for m in mats), sum(m.shape[1] for m in mats)))
    r = c = 0
    for m in mats:
        out[r:r + m.shape[0], c:c + m.shape[1]] = m
        r, c = r + m.shape[0], c + m.shape[1]
    return out


def _kron_matrices(mats: list[np.ndarray]) -> np.ndarray:
    out = np.ones((1, 1))
    for m in mats:
        out = np.kron(out, m)
    return out


SELECTIONS: Algebra[Selection] = Algebra(
    lambda w: Selection.of(torch.arange(w), w), _cat_selections, _kron_selections)
MATRICES: Algebra[np.ndarray] = Algebra(np.eye, _block_diag, _kron_matrices)


def compose(table: SpaceTable, sid: int, base: Callable[[int, bool], T | None],
            algebra: Algebra[T], primary: bool = True) -> T:
    """The transform of space `sid`: `base(sid, primary)` if it gives one (it must for base
    spaces), else composed from the parts of the space's derivation.

    Cost: one `base` call per space reached; cache inside `base` when it is expensive.
    """
    own = base(sid, primary)
    if own is not None:
        return own
    d = table[sid].derived
    if d is None:
        raise GraphmergeError(f"no transform was given for base space {sid}")
    first = next((k for k, p in enumerate(d.parts) if p is not None), None)
    parts = []
    for k, (p, w) in enumerate(zip(d.parts, d.sizes)):
        part_primary = primary and (d.kind == "cat" or k == first)
        parts.append(algebra.identity(w) if p is None
                     else compose(table, p, base, algebra, part_primary))
    return algebra.cat(parts) if d.kind == "cat" else algebra.kron(parts)

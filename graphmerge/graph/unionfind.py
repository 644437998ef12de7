"""A small union-find (disjoint sets) over hashable elements.

Path compression is iterative and union is by size, so `find` is amortised O(α(n)).
The grouping it produces does not depend on the order in which links are added.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator

__all__ = ["UnionFind"]


class UnionFind:
    """Disjoint sets; elements are added on first sight."""

    def __init__(self) -> None:
        self._parent: dict[Hashable, Hashable] = {}
        self._size: dict[Hashable, int] = {}

    def add(self, item: Hashable) -> None:
        if item not in self._parent:
            self._parent[item] = item
            self._size[item] = 1

    def __contains__(self, item: Hashable) -> bool:
        return item in self._parent

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._parent)

    def find(self, item: Hashable) -> Hashable:
        """The representative of `item`'s set (adds `item` if new)."""
        self.add(item)
        root = item
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[item] != root:  # compress the path just walked
            self._parent[item], item = root, self._parent[item]
        return root

    def union(self, *items: Hashable) -> Hashable:
        """Join the sets of all `items`; returns the new representative."""
        roots = list(dict.fromkeys(self.find(x) for x in items))
        if not roots:
            raise ValueError("union() needs at least one item")
        best = max(roots, key=lambda r: self._size[r])
        for r in roots:
            if r != best:
                self._parent[r] = best
                self._size[best] += self._size.pop(r)
        return best

    def groups(self) -> dict[Hashable, list[Hashable]]:
        """Representative -> members, members in insertion order."""
        out: dict[Hashable, list[Hashable]] = {}
        for x in self._parent:
            out.setdefault(self.find(x), []).append(x)
        return out

    def extend(self, items: Iterable[Hashable]) -> None:
        for x in items:
            self.add(x)

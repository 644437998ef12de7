"""Which spaces the matching merges, and to what width: the choices that the statistics pass,
the matching pass and `plan_merge` make alike, read from model 0's space table and the
`width=` and `attention=` options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphmerge.errors import ConfigError
from graphmerge.graph.spaces import Space, SpaceTable

__all__ = ["mergeable", "head_projections", "target_width", "check_width_spaces"]


def mergeable(table: SpaceTable) -> list[Space]:
    """Free base spaces that a matcher merges on their own (heads and head dims are merged
    through their projections, see `head_projections`)."""
    grouped = {sid for h, ks in table.heads.items() for sid in (h, *(d for _, d in ks))}
    return [s for s in table if not s.frozen and s.derived is None and s.id not in grouped]


def head_projections(table: SpaceTable, attention: str = "heads"
                     ) -> dict[int, dict[int, list[int]]]:
    """Per heads space, its projections (kron spaces) by head dim: {heads: {dim: [krons]}};
    the first of each is laid out heads × dim (its statistics score the heads), grouped
    queries (heads × group × dim) come last. None with attention="frozen" (heads and head
    dims keep the identity)."""
    out: dict[int, dict[int, list[int]]] = {}
    if attention == "frozen":
        return out
    for h, ks in table.heads.items():
        for k, d in sorted(ks, key=lambda kd: kd[0] in table.head_groups):
            out.setdefault(h, {}).setdefault(d, []).append(k)
    return out


def target_width(width: Any, sid: int, widths: list[int]) -> int | None:
    """The merged width r of space `sid`: `width` is None (the widest model's width), a ratio
    of it (float), or a mapping {space id: int width or float ratio} (others default).
    Values were validated by `MergeConfig`; the range depends on the models' widths."""
    if isinstance(width, Mapping):
        width = width.get(sid)
    if width is None:
        return None
    r = width if isinstance(width, int) else max(1, round(width * max(widths)))
    if not 1 <= r <= sum(widths):
        raise ConfigError(f"width {r} for space {sid} is out of range: 1 <= r <= "
                          f"{sum(widths)} (the sum of the models' widths {widths})")
    return r


def check_width_spaces(width: Any, merged: set[int], heads: set[int]) -> None:
    """A per-space `width` mapping may only name merged spaces (ConfigError otherwise)."""
    if isinstance(width, Mapping):
        unknown = sorted(set(width) - merged - heads)
        if unknown:
            raise ConfigError(f"width= names spaces {unknown} that are not merged; mergeable "
                              f"spaces: {sorted(merged)} (see graphmerge inspect)")

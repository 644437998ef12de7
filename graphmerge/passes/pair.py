"""Pass `pair_models`: after depth alignment every model must have model 0's topology."""

from __future__ import annotations

from graphmerge.match.pairing import pair_models as check_pairing
from graphmerge.passes.context import MergeContext
from graphmerge.passes.manager import merge_pass


@merge_pass(needs=("traced", "alignments"), provides=("paired",))
def pair_models(ctx: MergeContext) -> None:
    """Same nodes in the same order and the same space structure (widths may differ)."""
    check_pairing(ctx.traced)
    ctx.paired = True

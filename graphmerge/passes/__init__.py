"""Merge passes: small functions over a shared `MergeContext`, run in order by `graphmerge.merge`.

select_spaces → collect_statistics → match_spaces → attach_heads → merge_parameters
→ compile_merged (graphmerge.compile) → reset_norms.
"""

from .apply import merge_parameters
from .context import MergeContext, SpacePlan
from .heads import attach_heads
from .norms import reset_norms
from .plan import collect_statistics, match_spaces, select_spaces

__all__ = ["MergeContext", "SpacePlan", "select_spaces", "collect_statistics", "match_spaces",
           "attach_heads", "merge_parameters", "reset_norms"]

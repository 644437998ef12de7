"""The merge passes, each a small function over one `MergeContext`, and the order `merge` runs
them in (`PIPELINE`):

trace_models → check_spaces → align_depths → pair_models → fold_norms → collect_statistics
→ rotate_spaces → match_spaces → attach_heads → measure_coverage → merge_parameters → compile_merged → correct_norms
→ refit_linears → split_partial → build_match_graph
"""

from graphmerge.passes.check import check_spaces
from graphmerge.passes.compile import compile_merged
from graphmerge.passes.context import MergeContext, SpacePlan
from graphmerge.passes.coverage import measure_coverage
from graphmerge.passes.depth import align_depths, expand_uniformly
from graphmerge.passes.fold import fold_norms
from graphmerge.passes.heads import attach_heads
from graphmerge.passes.manager import Pass, PassOrderError, merge_pass, run_passes
from graphmerge.passes.matching import match_spaces
from graphmerge.passes.norms import correct_norms
from graphmerge.passes.pair import pair_models
from graphmerge.passes.parameters import merge_parameters
from graphmerge.passes.partial import split_partial
from graphmerge.passes.refit import refit_linears
from graphmerge.passes.report import build_match_graph
from graphmerge.passes.rotate import rotate_spaces
from graphmerge.passes.statistics import collect_statistics
from graphmerge.passes.trace import trace_models
from graphmerge.surgery.norms import reset_batch_norms  # re-exported: the tests use it

PIPELINE: tuple[Pass, ...] = (
    trace_models, check_spaces, align_depths, pair_models, fold_norms, collect_statistics,
    rotate_spaces, match_spaces, attach_heads, measure_coverage, merge_parameters, compile_merged, correct_norms,
    refit_linears, split_partial, build_match_graph,
)

__all__ = ["PIPELINE", "MergeContext", "SpacePlan", "Pass", "PassOrderError", "merge_pass",
           "run_passes", "trace_models", "check_spaces", "align_depths", "expand_uniformly",
           "pair_models", "fold_norms", "collect_statistics", "rotate_spaces", "match_spaces", "attach_heads",
           "measure_coverage", "merge_parameters", "compile_merged", "correct_norms",
           "refit_linears", "split_partial", "build_match_graph",
           "reset_batch_norms"]

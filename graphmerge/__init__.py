"""graphmerge: merge trained PyTorch models without training, across depths and widths.

Models are traced to torch.fx graphs; an analysis finds which tensor axes share one transform
(spaces); passes align depths, match and zip widths, and compile one executable GraphModule.
The pipeline, module by module: docs/architecture.md.
"""

from graphmerge.config import MergeConfig
from graphmerge.errors import (
    ConfigError,
    CoverageError,
    DataError,
    FewSamplesWarning,
    GraphmergeError,
    InexactExpansionWarning,
    LowCoverageWarning,
    MismatchError,
    SpaceCheckError,
    TracingError,
)
from graphmerge.graph.analyse import Analysed, trace
from graphmerge.graph.capture import Traced, Tracer
from graphmerge.graph.oracle import OracleReport, check_spaces, permute
from graphmerge.graph.spaces import (
    Derivation,
    Frozen,
    FrozenBy,
    Space,
    SpaceTable,
    UnsupportedOpWarning,
    find_spaces,
)
from graphmerge.io.folder import load_module, load_state, save_module
from graphmerge.io.onnx import export_onnx
from graphmerge.merge import MergeResult, SpaceSummary, merge
from graphmerge.plan import MergePlan, plan_merge
from graphmerge.surgery.deepen import deepen
from graphmerge.surgery.widen import widen

__all__ = [
    "trace", "Analysed", "Traced", "Tracer", "find_spaces", "Space", "SpaceTable", "Derivation",
    "Frozen", "FrozenBy", "permute", "check_spaces", "OracleReport", "UnsupportedOpWarning",
    "merge",
    "MergeResult", "SpaceSummary", "MergeConfig", "plan_merge", "MergePlan", "export_onnx",
    "save_module", "load_module", "load_state", "widen", "deepen",
    "GraphmergeError", "TracingError", "SpaceCheckError", "MismatchError", "ConfigError",
    "DataError", "CoverageError", "InexactExpansionWarning", "LowCoverageWarning",
    "FewSamplesWarning",
]
__version__ = "0.1.0"

"""graphmerge: merge trained PyTorch models without training, across depths and widths.

Models are traced to torch.fx graphs; an analysis finds which tensor axes share one transform
(spaces); passes align depths, match and zip widths, and compile one executable GraphModule.
"""

from .errors import (
    ConfigError, DataError, GraphmergeError, MismatchError, SpaceCheckError, TracingError,
)
from .depth import deepen
from .expand import widen
from .export import export_onnx, load_state, save_module
from .merge import MergeResult, merge
from .oracle import OracleReport, check_spaces, permute
from .spaces import Derivation, Space, SpaceTable, UnsupportedOpWarning, find_spaces
from .trace import Traced, Tracer, trace

__all__ = [
    "trace", "Traced", "Tracer", "find_spaces", "Space", "SpaceTable", "Derivation",
    "permute", "check_spaces", "OracleReport", "UnsupportedOpWarning", "merge", "MergeResult",
    "export_onnx", "save_module", "load_state", "widen", "deepen",
    "GraphmergeError", "TracingError", "SpaceCheckError", "MismatchError", "ConfigError",
    "DataError",
]
__version__ = "0.1.0"

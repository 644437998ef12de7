"""graphmerge: merge trained PyTorch models without training, across depths and widths.

Models are traced to torch.fx graphs; an analysis finds which tensor axes share one transform
(spaces); later passes match, align and zip them into one executable GraphModule.
"""

from .errors import (
    ConfigError, DataError, GraphmergeError, MismatchError, SpaceCheckError, TracingError,
)
from .merge import MergeResult, merge
from .oracle import OracleReport, check_spaces, permute
from .spaces import Derivation, Space, SpaceTable, UnsupportedOpWarning, find_spaces
from .trace import Traced, Tracer, trace

__all__ = [
    "trace", "Traced", "Tracer", "find_spaces", "Space", "SpaceTable", "Derivation",
    "permute", "check_spaces", "OracleReport", "UnsupportedOpWarning", "merge", "MergeResult",
    "GraphmergeError", "TracingError", "SpaceCheckError", "MismatchError", "ConfigError",
    "DataError",
]
__version__ = "0.1.0"

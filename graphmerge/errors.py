"""The errors graphmerge raises: one base class, one subclass per kind of failure.

Every message says what went wrong, where (node, op, space, file), and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "GraphmergeError",
    "TracingError",
    "SpaceCheckError",
    "MismatchError",
    "ConfigError",
    "DataError",
    "InexactExpansionWarning",
]


class GraphmergeError(Exception):
    """Base class of every error graphmerge raises on purpose."""


class TracingError(GraphmergeError):
    """A model could not be traced to a torch.fx graph or its shapes could not be propagated."""


class SpaceCheckError(GraphmergeError):
    """The permutation oracle found a space whose transform changes the model's function."""


class MismatchError(GraphmergeError):
    """Models that were asked to be merged do not fit together (shapes, families, stages)."""


class ConfigError(GraphmergeError, ValueError):
    """An argument or configuration value is invalid; the message lists what is allowed."""


class DataError(GraphmergeError):
    """Data is missing, empty, non-finite or of the wrong shape."""


class InexactExpansionWarning(UserWarning):
    """A depth expansion could not be exact (post-norm units) and was fitted instead; the
    message gives the error left per inserted unit."""

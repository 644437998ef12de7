"""Fashion-MNIST, read from the original IDX files shipped by the Debian package.

The Debian package ``dataset-fashion-mnist`` installs the four gzip-compressed IDX files
published by Zalando Research in ``/usr/share/datasets/fashion-mnist/``. This module parses them
itself (gzip + :func:`numpy.frombuffer`), checks magic numbers and sizes, and returns tensors.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from graphmerge.errors import ConfigError, DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_ENV_VAR",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_INSTALL_HINT",
    "fashion_mnist_root",
    "load_fashion_mnist",
]

logger = logging.getLogger(__name__)

#: The 10 class names, indexed by label (label 0 is "T-shirt/top", ..., label 9 is "Ankle boot").
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Computed once over all 60,000 x 28 x 28 pixels of the *train* split after scaling to [0, 1]
# (uint8 / 255), in float64: mean = x.mean(), std = x.std() (population std, ddof=0).
FASHION_MNIST_MEAN: float = 0.2860405970
FASHION_MNIST_STD: float = 0.3530242445

#: Environment variable that overrides the directory holding the IDX files.
FASHION_MNIST_ENV_VAR = "GRAPHMERGE_FASHION_MNIST"
#: Where the Debian package ``dataset-fashion-mnist`` puts the files.
DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: The shell command that installs the files.
FASHION_MNIST_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

_VALID_SPLITS = ("train", "test")
_FILE_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
_IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_SIDE = 28
_NUM_CLASSES = len(FASHION_MNIST_CLASSES)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """Return the directory to read the IDX files from.

    Precedence: the explicit ``root`` argument, then the environment variable
    ``GRAPHMERGE_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``.
    """
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_FASHION_MNIST_ROOT


def _find_file(root: Path, stem: str) -> Path:
    """Return ``root/stem.gz`` or, failing that, the uncompressed ``root/stem``."""
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}.gz not found in {root}. Install the data with "
        f"`{FASHION_MNIST_INSTALL_HINT}`, or point the `root` argument or the "
        f"{FASHION_MNIST_ENV_VAR} environment variable at a directory holding the four IDX files "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz)."
    )


def _read_bytes(path: Path) -> bytes:
    """Read a file, gunzipping it when its name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(
            f"Fashion-MNIST file {path} could not be read ({type(exc).__name__}: {exc}); it is "
            f"corrupt or truncated. Reinstall it with `apt-get install --reinstall -y "
            f"dataset-fashion-mnist` (or `{FASHION_MNIST_INSTALL_HINT}`)."
        ) from exc


def _parse_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file into a uint8 array of the shape its header declares.

    The IDX header is a big-endian int32 magic number ``0x00000800 | ndim`` (0x08 = unsigned
    byte), followed by ``ndim`` big-endian int32 dimension sizes, followed by the raw data.
    """
    raw = _read_bytes(path)
    fix = (
        f"Reinstall the file with `apt-get install --reinstall -y dataset-fashion-mnist` "
        f"(or `{FASHION_MNIST_INSTALL_HINT}`)."
    )
    if len(raw) < 4:
        raise DataError(
            f"IDX file {path} is only {len(raw)} bytes long, too short for a header. {fix}"
        )
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x}; "
            f"it is corrupt or not the right Fashion-MNIST file. {fix}"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes). {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_len:
        raise DataError(
            f"IDX file {path} holds {len(raw)} bytes but its header (dims {dims}) implies "
            f"{expected_len}; it is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_arrays(
    images_path: Path, labels_path: Path, split: str, stamp: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parse and check one split; cached in memory (callers must not modify the results).

    ``stamp`` (mtime_ns and size of both files) is only part of the cache key, so that a file
    replaced on disk is parsed again.

    Returns:
        images: uint8, shape [N, 28, 28]; labels: uint8, shape [N].
    """
    root = images_path.parent
    logger.info("Parsing Fashion-MNIST %s split from %s", split, root)
    images = _parse_idx(images_path, _IMAGE_MAGIC)
    labels = _parse_idx(labels_path, _LABEL_MAGIC)
    fix = f"Reinstall the files with `{FASHION_MNIST_INSTALL_HINT}`."
    if images.shape[1:] != (_SIDE, _SIDE):
        raise DataError(
            f"Fashion-MNIST images in {images_path} are {images.shape[1:]}, expected (28, 28). "
            f"{fix}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split} split has {images.shape[0]} images in {images_path} but "
            f"{labels.shape[0]} labels in {labels_path}; the files do not belong together. {fix}"
        )
    if images.shape[0] == 0:
        raise DataError(f"Fashion-MNIST {split} split in {root} holds no examples. {fix}")
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise DataError(
            f"Fashion-MNIST labels in {labels_path} go up to {int(labels.max())}, expected "
            f"0..9. {fix}"
        )
    if images.shape[0] != _EXPECTED_COUNT[split]:
        logger.warning(
            "Fashion-MNIST %s split in %s has %d examples, the official one has %d",
            split,
            root,
            images.shape[0],
            _EXPECTED_COUNT[split],
        )
    # np.frombuffer views are read-only; copy once so torch gets a writable, owned buffer.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def _stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of ``path``, or (-1, -1) when it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_mtime_ns, st.st_size)


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of Fashion-MNIST as tensors.

    Args:
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000 examples).
        root: directory holding the IDX ``.gz`` files; defaults to the environment variable
            ``GRAPHMERGE_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``.
        normalize: if True (default), standardise with :data:`FASHION_MNIST_MEAN` and
            :data:`FASHION_MNIST_STD` after scaling to [0, 1]; if False, return [0, 1] values.

    Returns:
        images: float32, shape [N, 1, 28, 28]; labels: int64, shape [N], values in 0..9
        (see :data:`FASHION_MNIST_CLASSES`). Fresh tensors: callers may modify them in place.
        Parsed files are cached in memory, so repeated calls skip the disk and the gunzip.

    Raises:
        ConfigError: ``split`` is not one of ``"train"``, ``"test"``.
        DataError: a file is missing, corrupt, truncated or inconsistent.
    """
    if split not in _VALID_SPLITS:
        raise ConfigError(
            f"Unknown Fashion-MNIST split {split!r}; valid values are "
            f"{', '.join(map(repr, _VALID_SPLITS))}."
        )
    directory = fashion_mnist_root(root).expanduser().resolve()
    images_stem, labels_stem = _FILE_STEMS[split]
    img_file = _find_file(directory, images_stem)
    lbl_file = _find_file(directory, labels_stem)
    stamp = (*_stamp(img_file), *_stamp(lbl_file))
    images, labels = _load_arrays(img_file, lbl_file, split, stamp)

    x = images.to(torch.float32).unsqueeze(1)  # new tensor [N, 1, 28, 28], values 0..255
    x.div_(255.0)
    if normalize:
        x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    y = labels.to(torch.int64)  # new tensor [N]
    return x, y

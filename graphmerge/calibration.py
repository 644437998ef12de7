"""The calibration data of a merge, streamed: any iterable of batches, read batch by batch.

`Calibration` wraps what the user passed (a DataLoader, a list, a generator, an endless
stream) and is what every pass iterates. Iterating it yields the model inputs of one batch
(labels dropped, moved to the merge's device), within the limits `max_batches` and
`max_samples` (the last batch is cut to fit).

A merge reads the data several times (statistics, then REPAIR or the BatchNorm reset), and every
pass must see the same samples: REPAIR sets each merged unit's statistics to its members'
measured in an earlier pass, so a data loader that draws new samples on each read (random
augmentation, a random dataset, shuffling) makes it wrong where units have few samples (53%
output error on a VGG whose classifier is a 7×7 conv on a 1×1 map). So the first complete read
is kept when its inputs fit in `KEEP_BYTES` (a one-shot iterator's always), and later passes
replay it; when it does not fit, each later read is checked batch by batch against the first
(shape, Σx, Σx² of every tensor input) and a batch that differs raises DataError.

Under `torch.distributed`, batch b goes to rank b mod world size: every rank reads its shard,
and the passes all-reduce their sums (`all_reduce`), so N processes compute what one does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import torch
import torch.utils.data
from tqdm.auto import tqdm

from graphmerge.errors import ConfigError, DataError
from graphmerge.graph.lockstep import nbytes
from graphmerge.inputs import split_batch

__all__ = ["Calibration", "KEEP_BYTES", "all_reduce", "distributed", "first_samples",
           "with_progress"]

KEEP_BYTES = 1 << 30  # a first read whose inputs fit is kept in memory and replayed


def distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the processes, in place (nothing to do in one process)."""
    if distributed()[1] == 1:
        return
    for t in tensors:
        torch.distributed.all_reduce(t)


def with_progress(calibration: Iterable[Any], desc: str, enabled: bool = True
                  ) -> Iterator[tuple[int, Any]]:
    """(batch index, model inputs) of `calibration` with a progress bar counting samples; any
    other iterable of model-input tuples is enumerated as it is."""
    if isinstance(calibration, Calibration):
        return calibration.progress(desc, enabled)
    return enumerate(calibration)


def _batch_size(inputs: tuple[Any, ...]) -> int:
    sizes = [x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    return int(sizes[0]) if sizes else 1


def first_samples(inputs: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """The first n samples of every batched tensor input (its first dimension the batch's);
    `inputs` itself when the batch has at most n samples."""
    return inputs if _batch_size(inputs) <= n else _cut(inputs, n)


def _cut(inputs: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    """The first n samples of every batched tensor input."""
    size = _batch_size(inputs)
    return tuple(x[:n] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size
                 else x for x in inputs)


class Calibration:
    """Calibration batches, streamed (see the module docstring).

    Args:
        data: an iterable of batches; a batch is a tensor or a tuple whose first `n_inputs`
            items are the model inputs (labels may follow).
        n_inputs: how many model inputs start each batch, or a function of the first batch
            that says.
        max_batches, max_samples: read at most this many batches / samples (None: no limit).
            An iterable without `len()` needs one of them: it may be endless.
        device: where the inputs are moved (None: left where they are).

    Raises:
        DataError: no data, a single tensor instead of batches.
        ConfigError: a bad limit, or an iterable without len() and no limit.
    """

    def __init__(self, data: Iterable[Any], n_inputs: int | Callable[[Any], int], *,
                 max_batches: int | None = None, max_samples: int | None = None,
                 device: torch.device | str | None = None) -> None:
        if data is None:
            raise DataError("no calibration data: pass a DataLoader or a list of batches")
        if isinstance(data, torch.Tensor):
            raise DataError("calibration must be an iterable of batches (e.g. a DataLoader or "
                            "[x[:128], x[128:256]]), not one tensor")
        if not isinstance(data, Iterable):
            raise DataError(f"calibration must be an iterable of batches (a DataLoader, a list "
                            f"or a generator), got {type(data).__name__}")
        for key, value in (("max_batches", max_batches), ("max_samples", max_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"{key} must be None or an int >= 1, got {value!r}")
        if max_batches is None and max_samples is None and not _sized(data):
            raise ConfigError(
                f"the calibration data ({type(data).__name__}) has no len(), so it may be "
                f"endless: pass max_batches= or max_samples= to say how much to read, or a list "
                f"or DataLoader")
        if distributed()[1] > 1 and isinstance(getattr(data, "sampler", None),
                                               torch.utils.data.RandomSampler):
            warnings.warn("the calibration DataLoader shuffles: under torch.distributed every "
                          "process draws its own order, so the shards overlap; pass "
                          "shuffle=False", stacklevel=3)
        self.n_inputs = n_inputs
        self.max_batches, self.max_samples = max_batches, max_samples
        self.device = None if device is None else torch.device(device)
        self._data = data
        self._kept: list[tuple[Any, ...]] | None = None
        self._prints: dict[int, tuple] = {}  # batch index -> its fingerprint in the first read
        if isinstance(data, Iterator):  # one-shot: read once, keep the batches in the limits
            self._kept = list(self._read(data))
        self.samples: int | None = None  # samples per pass (this rank's share), once known

    def _read(self, data: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
        """Model inputs of each batch, within the limits, on the device."""
        seen = 0
        for b, batch in enumerate(data):
            if self.max_batches is not None and b >= self.max_batches:
                return
            if callable(self.n_inputs):
                self.n_inputs = self.n_inputs(batch)
            inputs = split_batch(batch, self.n_inputs)
            if self.max_samples is not None:
                if seen >= self.max_samples:
                    return
                if seen + _batch_size(inputs) > self.max_samples:
                    inputs = _cut(inputs, self.max_samples - seen)
            seen += _batch_size(inputs)
            if self.device is not None:
                inputs = tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x
                               for x in inputs)
            yield inputs

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """This rank's batches (all of them in one process), checked and counted."""
        return (inputs for _, inputs in self.indexed())

    def indexed(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """This rank's batches with their index in the whole stream."""
        return self._batches(*distributed())

    def unsharded(self) -> Iterable[tuple[Any, ...]]:
        """Every batch, on every rank (re-iterable): for fits that cannot be summed over
        ranks."""
        batches = self._batches

        class Every:
            def __iter__(self) -> Iterator[tuple[Any, ...]]:
                return (inputs for _, inputs in batches(0, 1))

        return Every()

    def _batches(self, rank: int, world: int) -> Iterator[tuple[int, tuple[Any, ...]]]:
        count = 0
        self._load()
        streaming = self._kept is None
        source = self._read(self._data) if streaming else self._kept
        for b, inputs in enumerate(source):
            if streaming:
                self._check_same(b, inputs)
            if b % world != rank:
                continue
            for x in inputs:
                if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(
                        torch.isfinite(x).all()):
                    raise DataError(f"calibration batch {b} contains NaN or infinite values")
            count += _batch_size(inputs)
            yield b, inputs
        if count == 0 and world == 1:
            raise DataError("the calibration data is empty: pass at least one batch "
                            "(e.g. a DataLoader over a few hundred training inputs)")
        self.samples = count

    def _load(self) -> None:
        """The first read: kept when its inputs fit in KEEP_BYTES; otherwise the batches read
        until they overflowed are fingerprinted, and later reads are checked against them."""
        if self._kept is not None or self._prints:
            return
        kept, held = [], 0
        for b, inputs in enumerate(self._read(self._data)):
            self._prints[b] = _fingerprint(inputs)
            held += nbytes(inputs)
            if held > KEEP_BYTES:
                return
            kept.append(inputs)
        self._kept = kept

    def _check_same(self, b: int, inputs: tuple[Any, ...]) -> None:
        """DataError when batch b differs from its first read (recorded when it is new)."""
        now = _fingerprint(inputs)
        first = self._prints.setdefault(b, now)
        if first != now:
            raise DataError(
                f"calibration batch {b} differs between two reads of the data (random "
                f"augmentation, a dataset that draws random samples, or a shuffling loader). A "
                f"merge reads the calibration data several times (statistics, then REPAIR or the "
                f"BatchNorm reset) and needs the same samples each time; the data is too large "
                f"to keep in memory ({KEEP_BYTES >> 20} MiB), so pass fixed data: a DataLoader "
                f"without random transforms and with shuffle=False, or fewer batches "
                f"(max_batches=)")

    def first(self) -> tuple[Any, ...]:
        """The model inputs of the first batch (the default example inputs)."""
        self._load()
        source = self._kept if self._kept is not None else self._read(self._data)
        for inputs in source:
            return inputs
        raise DataError("the calibration data is empty: pass at least one batch")

    def progress(self, desc: str, enabled: bool = True
                 ) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """`indexed()` with a progress bar counting samples."""
        with tqdm(desc=desc, unit="sample", total=self.samples, disable=not enabled,
                  leave=False) as bar:
            for b, inputs in self.indexed():
                yield b, inputs
                bar.update(_batch_size(inputs))


def _fingerprint(inputs: tuple[Any, ...]) -> tuple:
    """Shape, Σx and Σx² (float64) of each tensor input: equal for the same samples."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and not x.is_complex():
            v = x.detach().double()
            out.append((tuple(x.shape), float(v.sum()), float((v * v).sum())))
    return tuple(out)


def _sized(data: Any) -> bool:
    if not isinstance(data, Sized):
        return False
    try:
        len(data)
    except TypeError:  # e.g. a DataLoader over an IterableDataset
        return False
    return True

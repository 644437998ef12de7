"""Freed memory handed back to the system between the merge's large steps.

The C allocator keeps what a step freed in its heap (the float64 copy of the oracle, a pass's
temporaries of less than 32 MiB each) for later allocations; the next step's large tensors are
mapped afresh instead, so the process holds both. `give_back()` returns the free part of the
heap (glibc's `malloc_trim`; nothing elsewhere), after collecting the cyclic garbage that
still holds tensors (a traced module and its interpreter refer to each other, so the float64
copy of the oracle outlives its pass until the collector runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
from collections.abc import Iterable

import torch.nn as nn

__all__ = ["give_back"]

log = logging.getLogger(__name__)


@functools.cache
def _trim():  # noqa: ANN202 - a C function or None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


#: models of fewer parameter bytes than this are left alone: a full collection costs time
#: that grows with everything the process holds (seconds in a long-lived one), and what it
#: would return is small
GIVE_BACK_BYTES = 128 << 20


def give_back(models: Iterable[nn.Module] = ()) -> None:
    """Free the cyclic garbage, then return the allocator's free heap memory to the system,
    where it can (glibc); only when `models` hold at least `GIVE_BACK_BYTES` of parameters."""
    held = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    if held < GIVE_BACK_BYTES:
        return
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
        log.debug("freed heap memory given back (malloc_trim)")

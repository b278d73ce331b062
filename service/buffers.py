"""Large step buffers handed out again once nothing refers to them.

A 10M-parameter float32 step takes in a 40 MB body and hands out 40 MB of deltas. glibc
maps buffers that large afresh on every ``malloc`` (its mmap threshold stops at 32 MiB,
:mod:`service.heap`), so each step page-faulted both back in: filling a fresh 40 MB buffer
measured 7.7 ms here, refilling a reused one 3.0 ms. :class:`BufferPool` keeps the last few
large buffers and hands one out again once the pool holds the only reference to it.

That test is exact: every array, view and ``memoryview`` made from a buffer keeps the
buffer referenced (numpy views hold their base), so a buffer still read by anyone (the
decoded gradients of a step being logged, deltas kept for an idempotent retry, a reply
the transport is still sending) is never handed out twice.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

PAGE = 4096
"""A memory page: tensors received at a page boundary can be written with ``O_DIRECT``
from where they are (the disk store's blocks are this size too)."""

MIN_BYTES = 1 << 20
"""Buffers smaller than this come from ``np.empty``: the allocator reuses them itself."""

_FREE_REFS = 2
"""``sys.getrefcount`` of a pooled buffer nobody else holds: the pool's list and the
call's own argument."""


class BufferPool:
    """Up to ``keep`` large byte buffers, reused by exact size, least recently used
    forgotten first (a buffer still in use is then simply no longer the pool's)."""

    def __init__(self, keep: int = 8, min_bytes: int = MIN_BYTES) -> None:
        self._keep = keep
        self._min_bytes = min_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A writable one-dimensional uint8 array of ``nbytes``, its contents undefined."""
        if nbytes < self._min_bytes:
            return np.empty(nbytes, dtype=np.uint8)
        buffers = self._buffers
        with self._lock:
            for i in range(len(buffers) - 1, -1, -1):
                if buffers[i].nbytes == nbytes and sys.getrefcount(buffers[i]) == _FREE_REFS:
                    buffer = buffers.pop(i)
                    buffers.append(buffer)  # most recently used last
                    return buffer
            # np.empty: the pages of a new buffer become resident only as they are written.
            buffer = np.empty(nbytes, dtype=np.uint8)
            buffers.append(buffer)
            del buffers[: -self._keep]
            return buffer

    def array(self, shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` from the pool."""
        return self.take(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


STEP_BUFFERS = BufferPool()
"""The server's pool: request bodies and the deltas of large steps."""

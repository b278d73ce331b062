"""Appending log frames durably, with ``O_DIRECT`` where the filesystem allows it.

A buffered append copies the frame into the page cache and ``fdatasync`` then writes it
back; when the machine has much dirty memory (other processes writing), the kernel
throttles that copy and it alone can take several times the device's write time.
``O_DIRECT`` skips the page cache: the frame goes from an aligned staging buffer straight
to the device, at a steady cost close to the device's own. It needs block-aligned offsets,
lengths and buffers, so every frame starts on a :data:`BLOCK` boundary (zero padding in
between) and is staged through a page-aligned buffer per thread. Where ``O_DIRECT`` is
refused (tmpfs, some network filesystems) the same layout is written through the page
cache instead.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence

BLOCK = 4096
"""Frames start at multiples of this; it is a multiple of every common logical block size."""

_DIRECT = getattr(os, "O_DIRECT", 0)
_ZEROS = bytes(BLOCK)
_local = threading.local()


def aligned(n: int) -> int:
    return n + (-n % BLOCK)


def open_log(path: str | os.PathLike[str], *, create: bool) -> tuple[int, bool]:
    """Open a log file for appending; returns the fd and whether it bypasses the cache."""
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    if _DIRECT:
        try:
            return os.open(path, flags | _DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _staging(size: int) -> mmap.mmap:
    """A page-aligned scratch buffer of at least ``size`` bytes, owned by this thread."""
    buffer: mmap.mmap | None = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < size:
        if buffer is not None:
            buffer.close()
        capacity = max(1 << 20, 1 << (size - 1).bit_length())
        buffer = mmap.mmap(-1, capacity)
        _local.buffer = buffer
    return buffer


def _stop_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)


def append(fd: int, direct: bool, offset: int, buffers: Sequence[bytes | memoryview]) -> int:
    """Write ``buffers`` at ``offset`` (a block boundary), padded to a block, then
    ``fdatasync``. Returns the padded length, so the next frame starts aligned again."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(v.nbytes for v in views)
    padded = aligned(total)
    if direct:
        stage = memoryview(_staging(padded))
        pos = 0
        for view in views:
            stage[pos : pos + view.nbytes] = view
            pos += view.nbytes
        stage[pos:padded] = _ZEROS[: padded - pos]
        try:
            _pwrite_all(fd, [stage[:padded]], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The filesystem accepted O_DIRECT at open but not this write: go buffered.
            _stop_direct(fd)
            _pwrite_all(fd, [*views, _ZEROS[: padded - total]], offset)
    else:
        _pwrite_all(fd, [*views, _ZEROS[: padded - total]], offset)
    os.fdatasync(fd)
    return padded


def _pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> None:
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    while views:
        n = os.pwritev(fd, views[:1024], offset)
        offset += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]

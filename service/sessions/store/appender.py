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

A log's blocks are reserved ahead of its end (:func:`reserve`, ``fallocate`` with
``FALLOC_FL_KEEP_SIZE``, on Linux): an append into blocks the file already owns changes
only its size, so its ``fdatasync`` commits no block allocation. On a virtual disk that
took a small durable append from 4 ms to 0.25 ms, which is what bounds the rate of small
durable steps. The file's size stays that of its frames (readers see nothing new); the
reserved blocks past it are given back when the log is closed (:func:`release`).

A log of small frames goes further: its appends write zeros past the frame too
(:func:`zeros_ahead`), so that the file holds written blocks ahead of its last frame. An
append into those changes no metadata at all, which lets it go to the kernel as one
asynchronous request (``aio``) instead of a thread's blocking calls. A log of large frames
(up to :data:`LARGE_ZEROS_MAX_FRAME`) has the zeros for its next frames written in the
background after each append instead (:func:`write_zeros`), off the step's path. Readers
take zeros after the last frame for what they are: room for the next ones (``logfile``).
They are given back when the log is closed, like reserved blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Callable, Sequence

import numpy as np

BLOCK = 4096
"""Frames start at multiples of this; it is a multiple of every common logical block size."""

_DIRECT = getattr(os, "O_DIRECT", 0)
_ZEROS = bytes(BLOCK)
_local = threading.local()

_KEEP_SIZE = 0x01
"""``FALLOC_FL_KEEP_SIZE``: allocate blocks past the end without changing the size."""
RESERVE_MIN = 1 << 20
RESERVE_MAX = 64 << 20
ZEROS_AHEAD_MIN = 1 << 20
ZEROS_AHEAD_MAX = 4 << 20
LARGE_ZEROS_MAX_FRAME = 16 << 20
"""Frames up to this size, written from a thread, get the blocks of the frames after them
written as zeros in the background (:func:`write_zeros`): an append over written blocks
flushes its data alone, with no block allocation to commit, which measured 0.7 ms for
4 MiB here against 1.3 ms into reserved blocks, at the price of writing each block twice.
Past this size a step computes for longer than its frame takes to write, and the zeros
would only double the disk's work."""
ZEROS_AHEAD_MAX_FRAME = 256 << 10
_zero_pages: mmap.mmap | None = None
NO_RESERVING = 1 << 62
"""What :func:`reserve` returns where the filesystem cannot reserve: never try again."""


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError, TypeError):
        return None  # not Linux: appends allocate as they go
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def reserve(fd: int, end: int, frame: int) -> int:
    """Reserve blocks from ``end`` (the file's size) for at least ``frame`` more bytes and
    a margin (eight such frames, between 1 and 64 MiB); returns the reserved end, or
    :data:`NO_RESERVING` where the filesystem or system does not support it."""
    if _fallocate is None:
        return NO_RESERVING
    length = aligned(max(frame, min(RESERVE_MAX, max(RESERVE_MIN, 8 * frame))))
    if _fallocate(fd, _KEEP_SIZE, end, length) != 0:
        if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return NO_RESERVING
        return end  # out of space, say: the append itself will report it
    return end + length


def release(fd: int, size: int) -> None:
    """Give back the blocks reserved, and the zeros written, past ``size`` (the end of the
    log's frames)."""
    # A failure only leaves the reservation in place: the log is intact either way.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)


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


class Staging:
    """A page-aligned buffer that frames are copied into for ``O_DIRECT`` writes."""

    def __init__(self) -> None:
        self._buffer: mmap.mmap | None = None
        self._address: int | None = None

    def _room(self, size: int) -> memoryview:
        if self._buffer is None or len(self._buffer) < size:
            self._address = None
            self._buffer = mmap.mmap(-1, max(1 << 16, 1 << (size - 1).bit_length()))
        return memoryview(self._buffer)

    def fill(self, views: Sequence[memoryview], padded: int) -> memoryview:
        """The frame's bytes, zero-padded to ``padded``, in this buffer (grown to fit)."""
        stage = self._room(padded)
        pos = 0
        for view in views:
            stage[pos : pos + view.nbytes] = view
            pos += view.nbytes
        stage[pos:padded] = _ZEROS[: padded - pos]
        return stage[:padded]

    def segments(self, views: Sequence[memoryview], padded: int) -> list[memoryview]:
        """The frame as ``O_DIRECT`` takes it, zero-padded to ``padded``: buffers that are
        block-aligned both in memory and in the frame (a tensor of a block-aligned frame,
        ``logfile.encode``, received into an aligned buffer) are written from where they
        are, their whole blocks at least; the rest is copied into this buffer, in segments
        that each start on a block."""
        stage = self._room(padded)
        out: list[memoryview] = []
        start = fill = 0  # the segment being staged: from start to fill, in the buffer
        for view in views:
            whole = view.nbytes - view.nbytes % BLOCK
            if whole and fill % BLOCK == 0 and _address(view) % BLOCK == 0:
                # Where the frame is block-aligned, so is the staging buffer's fill.
                if fill > start:
                    out.append(stage[start:fill])
                out.append(view[:whole])
                view = view[whole:]
                start = fill
            stage[fill : fill + view.nbytes] = view
            fill += view.nbytes
        end = start + aligned(fill - start)
        stage[fill:end] = _ZEROS[: end - fill]
        if end > start:
            out.append(stage[start:end])
        return out

    @property
    def address(self) -> int:
        """Where the buffer is in memory (for a kernel request that reads it later)."""
        assert self._buffer is not None, "fill comes first"
        if self._address is None:
            self._address = _address(memoryview(self._buffer))
        return self._address


def _address(view: memoryview) -> int:
    """Where a (possibly read-only) buffer's bytes are in memory."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _staging() -> Staging:
    """This thread's staging buffer."""
    staging: Staging | None = getattr(_local, "staging", None)
    if staging is None:
        staging = _local.staging = Staging()
    return staging


def frame_views(buffers: Sequence[bytes | memoryview]) -> tuple[list[memoryview], int]:
    """The buffers as byte views, and their total length."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    return views, sum(v.nbytes for v in views)


def zeros_ahead(frame: int) -> int:
    """Bytes of written zeros to keep past the end of a log whose frames take ``frame``
    bytes: about sixteen frames (1 to 4 MiB), so that the appends that follow overwrite
    blocks already written (``aio``). None for frames over 256 KiB: those are written
    from a thread, overlapped with their update, and the zeros would double their I/O."""
    if frame > ZEROS_AHEAD_MAX_FRAME:
        return 0
    return aligned(min(ZEROS_AHEAD_MAX, max(ZEROS_AHEAD_MIN, 16 * frame)))


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` bytes of zeros at ``offset`` (both multiples of a block) and
    ``fdatasync``: blocks a later append overwrites with nothing but data to flush."""
    pieces = [
        _zeros(min(ZEROS_AHEAD_MAX, length - start)) for start in range(0, length, ZEROS_AHEAD_MAX)
    ]
    _pwrite_all(fd, pieces, offset)
    os.fdatasync(fd)


def _zeros(length: int) -> memoryview:
    global _zero_pages
    if _zero_pages is None:
        _zero_pages = mmap.mmap(-1, ZEROS_AHEAD_MAX)
    return memoryview(_zero_pages)[:length]


def _stop_direct(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_DIRECT)


def append(
    fd: int, direct: bool, offset: int, buffers: Sequence[bytes | memoryview], zeros: int = 0
) -> int:
    """Write ``buffers`` at ``offset`` (a block boundary), padded to a block and followed
    by ``zeros`` bytes of zeros (a multiple of a block), then ``fdatasync``. Returns the
    padded length, so the next frame starts aligned again."""
    return append_views(fd, direct, offset, *frame_views(buffers), zeros)


def append_views(
    fd: int, direct: bool, offset: int, views: Sequence[memoryview], total: int, zeros: int = 0
) -> int:
    """:func:`append` of buffers already made :func:`frame_views` (``total`` bytes)."""
    padded = write_views(fd, direct, offset, views, total, zeros)
    os.fdatasync(fd)
    return padded


def write_views(
    fd: int, direct: bool, offset: int, views: Sequence[memoryview], total: int, zeros: int = 0
) -> int:
    """:func:`append_views` without the ``fdatasync``: the bytes are written, not yet
    durable. Returns the padded length."""
    padded = aligned(total)
    after = [_zeros(zeros)] if zeros else []
    if direct:
        try:
            _pwrite_all(fd, [*_staging().segments(views, padded), *after], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The filesystem accepted O_DIRECT at open but not this write: go buffered.
            _stop_direct(fd)
            _pwrite_all(fd, [*views, _ZEROS[: padded - total], *after], offset)
    else:
        _pwrite_all(fd, [*views, _ZEROS[: padded - total], *after], offset)
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

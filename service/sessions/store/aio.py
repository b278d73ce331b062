"""Linux's native asynchronous I/O, for durable writes that never block the event loop.

An ``O_DIRECT`` write submitted with ``io_submit`` and the ``RWF_DSYNC`` flag is the
append and its ``fdatasync`` in one request: the event loop submits it (about 20 us) and
goes on serving; the kernel signals the completion on an ``eventfd`` that the loop
watches. No thread, so no GIL handovers: with four clients stepping 1k-parameter
sessions, those handovers cost the server more CPU than the steps themselves.

The kernel completes such a write asynchronously only when it changes no file metadata:
an overwrite of blocks that are already written (``ext4`` performs a write that extends
the file inside ``io_submit``). Logs therefore keep a stretch of written zeros ahead of
their end (``appender``), and only writes into it come here.

The system calls go through ``ctypes.PyDLL``, which keeps the GIL across the call: each
returns at once, and releasing and re-taking the GIL would cost more than the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_IOCB_CMD_PWRITE = 1
_IOCB_FLAG_RESFD = 1 << 0
_SYSCALLS = {"x86_64": (206, 208, 209, 207), "aarch64": (0, 4, 2, 1)}
"""io_setup, io_getevents, io_submit, io_destroy."""
_BATCH = 64


class _Iocb(ctypes.Structure):
    # struct iocb of <linux/aio_abi.h>, little-endian layout.
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("key", ctypes.c_uint32),
        ("rw_flags", ctypes.c_int32),
        ("opcode", ctypes.c_uint16),
        ("reqprio", ctypes.c_int16),
        ("fildes", ctypes.c_uint32),
        ("buf", ctypes.c_uint64),
        ("nbytes", ctypes.c_uint64),
        ("offset", ctypes.c_int64),
        ("reserved2", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


@dataclass
class DirectWrite:
    """One block-aligned write into a log's written zeros, ready to submit."""

    fd: int
    address: int
    """Of a page-aligned buffer that stays alive and unchanged until the write is over."""
    length: int
    offset: int
    finish: Callable[[], int]
    """Once the write is durable: record it in the log; returns the bytes it takes."""
    abandon: Callable[[], None]
    """Once it failed: leave nothing of it behind."""


Completion = Callable[[int], None]
"""Called with the write's result: the bytes written, or ``-errno``."""


class AsyncWrites:
    """An AIO context and the eventfd its completions are signalled on."""

    def __init__(self, depth: int = 1024) -> None:
        numbers = _SYSCALLS.get(os.uname().machine) if sys.platform == "linux" else None
        if numbers is None:
            raise OSError("native asynchronous I/O needs Linux on x86_64 or aarch64")
        self._setup, self._getevents, self._submit, self._destroy = numbers
        self._libc = ctypes.PyDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        context = ctypes.c_ulong(0)
        setup = ctypes.c_long(self._setup)
        if self._libc.syscall(setup, ctypes.c_long(depth), ctypes.byref(context)):
            errno = ctypes.get_errno()
            raise OSError(errno, f"io_setup: {os.strerror(errno)}")
        self._context = context
        self.fileno = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pending: dict[int, tuple[_Iocb, Completion]] = {}
        self._next = 0
        self._events = (_Event * _BATCH)()
        self._no_wait = _Timespec(0, 0)

    def submit(self, writes: Sequence[tuple[DirectWrite, Completion]]) -> int:
        """Start ``writes`` (``O_DSYNC`` semantics) in one request to the kernel; each
        one's completion is called from :meth:`reap`. Returns how many the kernel took
        (the first ones, in order); raises OSError when it took none (nothing was written
        then). One request for several writes costs the kernel little more than one."""
        iocbs = []
        for write, done in writes:
            self._next += 1
            iocb = _Iocb(
                data=self._next,
                rw_flags=os.RWF_DSYNC,
                opcode=_IOCB_CMD_PWRITE,
                fildes=write.fd,
                buf=write.address,
                nbytes=write.length,
                offset=write.offset,
                flags=_IOCB_FLAG_RESFD,
                resfd=self.fileno,
            )
            iocbs.append(iocb)
            self._pending[self._next] = (iocb, done)
        pointers = (ctypes.POINTER(_Iocb) * len(iocbs))(*(ctypes.pointer(i) for i in iocbs))
        taken = self._libc.syscall(
            ctypes.c_long(self._submit), self._context, ctypes.c_long(len(iocbs)), pointers
        )
        errno = ctypes.get_errno()
        for iocb in iocbs[max(taken, 0) :]:
            del self._pending[iocb.data]
        if taken <= 0:
            raise OSError(errno, f"io_submit: {os.strerror(errno)}")
        return int(taken)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def reap(self) -> None:
        """Hand every completed write's result to its callback (when the eventfd reads)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fileno)
        while self._pending and self._collect(0, ctypes.byref(self._no_wait)) == _BATCH:
            pass

    def wait(self) -> None:
        """Block until at least one write in flight completes, and hand its result over."""
        if self._pending:
            self._collect(1, None)

    def _collect(self, at_least: int, timeout: object) -> int:
        got = int(
            self._libc.syscall(
                ctypes.c_long(self._getevents),
                self._context,
                ctypes.c_long(at_least),
                ctypes.c_long(_BATCH),
                self._events,
                timeout,
            )
        )
        for event in self._events[: max(got, 0)]:
            _, done = self._pending.pop(event.data)
            done(event.res)
        return got

    def close(self) -> None:
        """Wait for the writes in flight (the kernel does), then release the context."""
        self._libc.syscall(ctypes.c_long(self._destroy), self._context)
        os.close(self.fileno)
        self._pending.clear()

"""The on-disk event log: checksummed, length-prefixed frames, appended and fsynced.

One frame per event, each starting on a 4096-byte boundary (zeros in between, so that
frames can be written with ``O_DIRECT``; see ``appender``)::

    magic "OSL1" | u32 header_len | u64 data_len | u32 crc32 | u32 zero
    header (JSON, header_len bytes, padded to 8)
    data   (each tensor's raw little-endian bytes, each padded to 8)

The CRC covers both lengths, the header and the data, so a frame whose tail never reached
the disk (a crash mid-write, a torn page after power loss) fails the check and is
dropped with everything after it: the log ends at the last complete event, which is the
last one that was acknowledged (appends are fsynced before the step is answered).
Tensors are written straight from their buffers with ``writev`` (no staging copy) and read
back as views of the file's bytes.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.sessions.store.appender import aligned
from service.sessions.store.base import Event

MAGIC = b"OSL1"
_PREFIX = struct.Struct("<4sIQII")
PREFIX_SIZE = _PREFIX.size
ALIGN = 8
_ZEROS = bytes(ALIGN)


def _pad(n: int) -> int:
    return -n % ALIGN


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and C-ordered, without a copy where possible."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8).data


def encode(event: Event) -> list[bytes | memoryview]:
    """The frame for ``event`` as a list of buffers, ready for ``writev``."""
    tensors: list[list[Any]] = []
    payload: list[memoryview] = []
    offset = 0
    groups = [("g", event.grads), ("p", event.params or {})]
    for group, arrays in groups:
        for name, array in arrays.items():
            raw = _raw(array)
            dtype = np.dtype(array.dtype).newbyteorder("<").str
            tensors.append([group, name, dtype, list(array.shape), offset, raw.nbytes])
            payload.append(raw)
            offset += raw.nbytes + _pad(raw.nbytes)
    header = json.dumps(
        {
            "seq": event.seq,
            "kind": event.kind,
            "at": event.at,
            "key": event.key,
            "fingerprint": event.fingerprint,
            "want": event.want,
            "loss": event.loss,
            "metric": event.metric,
            "has_params": event.params is not None,
            "tensors": tensors,
            # Only federated events carry details; other frames stay as they were.
            **({"info": event.info} if event.info is not None else {}),
        },
        separators=(",", ":"),
    ).encode()
    head_pad = _ZEROS[: _pad(len(header))]
    lengths = struct.pack("<IQ", len(header), offset)
    crc = zlib.crc32(lengths)
    crc = zlib.crc32(header, crc)
    crc = zlib.crc32(head_pad, crc)
    body: list[bytes | memoryview] = []
    for raw in payload:
        crc = zlib.crc32(raw, crc)
        body.append(raw)
        pad = _ZEROS[: _pad(raw.nbytes)]
        if pad:
            crc = zlib.crc32(pad, crc)
            body.append(pad)
    prefix = _PREFIX.pack(MAGIC, len(header), offset, crc, 0)
    return [prefix, header, head_pad, *body]


def write_all(fd: int, buffers: Sequence[bytes | memoryview]) -> int:
    """``writev`` every buffer, resuming after short writes. Returns the bytes written."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(v.nbytes for v in views)
    written = 0
    while views:
        # writev takes at most IOV_MAX buffers at once.
        n = os.writev(fd, views[:1024])
        written += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    assert written == total
    return total


@dataclass(frozen=True)
class Scan:
    """What reading a log file found: its whole events and where the valid part ends."""

    events: list[Event]
    valid_bytes: int
    """Where the next frame goes: the block boundary after the last whole frame."""
    torn: bool
    """True when bytes after ``valid_bytes`` were not a whole, intact frame."""


def scan(data: np.ndarray) -> Scan:
    """Parse frames from a log file's bytes (a uint8 array), stopping at the first bad one."""
    events: list[Event] = []
    pos = 0
    end = data.size
    buf = data.data
    for event, size in _frames(data, buf, end):
        events.append(event)
        pos += size
    return Scan(events, pos, pos < end)


def _frames(data: np.ndarray, buf: memoryview, end: int) -> Iterator[tuple[Event, int]]:
    pos = 0
    while pos + PREFIX_SIZE <= end:
        magic, header_len, data_len, crc, _ = _PREFIX.unpack_from(buf, pos)
        if magic != MAGIC:
            return
        head_start = pos + PREFIX_SIZE
        data_start = head_start + header_len + _pad(header_len)
        frame_end = data_start + data_len
        if frame_end > end:
            return
        check = zlib.crc32(buf[pos + 4 : pos + 16])
        check = zlib.crc32(buf[head_start:frame_end], check)
        if check != crc:
            return
        try:
            event = _decode(bytes(buf[head_start : head_start + header_len]), data, data_start)
        except (ValueError, KeyError, TypeError, IndexError):
            return
        yield event, aligned(frame_end) - pos
        pos = aligned(frame_end)


def _decode(header_bytes: bytes, data: np.ndarray, data_start: int) -> Event:
    header = json.loads(header_bytes)
    grads: dict[str, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    for group, name, dtype, shape, offset, nbytes in header["tensors"]:
        start = data_start + offset
        raw = data[start : start + nbytes]
        array = raw.view(np.dtype(dtype)).reshape(shape)
        (grads if group == "g" else params)[name] = array
    return Event(
        seq=header["seq"],
        kind=header["kind"],
        at=header["at"],
        key=header["key"],
        fingerprint=header["fingerprint"],
        want=header["want"],
        grads=grads,
        params=params if header["has_params"] else None,
        loss=header["loss"],
        metric=header["metric"],
        info=header.get("info"),
    )


def read_file(path: str | os.PathLike[str]) -> np.ndarray:
    """A whole file as an aligned uint8 array (tensor views into it stay aligned)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = np.empty(size, dtype=np.uint8)
        view = data.data
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    return data[:got]

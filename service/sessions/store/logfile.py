"""The on-disk event log: checksummed, length-prefixed frames, appended and fsynced.

One frame per event, each starting on a 4096-byte boundary (zeros in between, so that
frames can be written with ``O_DIRECT``; see ``appender``)::

    magic "OSL2" | u32 header_len | u64 data_len | u64 xxh3 checksum
    header (JSON, header_len bytes, padded to 8; names the session it belongs to)
    data   (each tensor's raw little-endian bytes, each padded to 8)

The checksum covers both lengths, the header and the data. Reading a log tells three
endings apart:

- *clean*: the file ends after its last whole frame, or holds only zeros after it (room
  written ahead for the next frames, see ``appender``);
- *torn*: what follows the last whole frame is one write that never completed (shorter
  than its frame says, or with a sector that never reached the disk, all zeros) and
  nothing intact comes after it. A crash mid-append leaves this, and since appends are
  fsynced before the step is answered, the event was never acknowledged: it may go;
- *damaged*: anything else (a frame that is whole but fails its checksum, intact frames
  after a bad one, bytes that are no frame, a frame of another session). Something that
  was acknowledged may be lost: the store must say so, not cut it away.

Tensors are written straight from their buffers with ``writev`` (no staging copy) and read
back as views of the file's bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.sessions.store import checksum
from service.sessions.store.appender import BLOCK, aligned
from service.sessions.store.base import Event

MAGIC = b"OSL2"
_PREFIX = struct.Struct("<4sIQQ")
PREFIX_SIZE = _PREFIX.size
ALIGN = 8
_ZEROS = bytes(ALIGN)
_BLOCK_ZEROS = bytes(BLOCK)
SECTOR = 512
"""The smallest unit a disk writes: a torn write leaves whole sectors unwritten (zeros)."""
MAX_HEADER = 1 << 26
"""No header is this long (a tensor table of the largest session is a few MB): a longer
one is a damaged length, not a write cut short."""


def _pad(n: int) -> int:
    return -n % ALIGN


def _raw(array: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and C-ordered, without a copy where possible."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.reshape(-1).view(np.uint8).data


def encode(
    event: Event, session: str = "", block_aligned: bool = False
) -> list[bytes | memoryview]:
    """The frame for ``event`` of ``session`` as a list of buffers, ready for ``writev``:
    :func:`layout`'s, sealed with its checksum (its head, then its tensors)."""
    unsealed = layout(event, session, block_aligned)
    return [*unsealed.head(unsealed.checksum()), *unsealed.body]


@dataclass(frozen=True)
class Unsealed:
    """A frame laid out but not yet checksummed: its tensors can be written while the
    checksum is computed, and its head (which holds the checksum) after them."""

    header: bytes
    body: list[bytes | memoryview]
    """The tensors' bytes with their padding, as the frame holds them after its head."""
    data_len: int

    @property
    def head_bytes(self) -> int:
        """The length of :meth:`head`'s buffers."""
        return PREFIX_SIZE + len(self.header) + _pad(len(self.header))

    def checksum(self) -> int:
        """The frame's checksum: of both lengths, the header and the data."""
        lengths = struct.pack("<IQ", len(self.header), self.data_len)
        return checksum.digest([lengths, self.header, _head_pad(self.header), *self.body])

    def head(self, check: int) -> list[bytes | memoryview]:
        """The buffers before the tensors (prefix, header, padding), holding ``check``; a
        block-aligned frame's head ends on a block."""
        prefix = _PREFIX.pack(MAGIC, len(self.header), self.data_len, check)
        return [prefix, self.header, _head_pad(self.header)]


def _head_pad(header: bytes) -> bytes:
    return _ZEROS[: _pad(len(header))]


def layout(event: Event, session: str = "", block_aligned: bool = False) -> Unsealed:
    """The frame for ``event`` of ``session``, all but its checksum.

    ``block_aligned`` starts every tensor of a block or more on a :data:`BLOCK` boundary
    of the file (the frame starts on one): the header is padded with spaces, and zeros go
    before such a tensor. An ``O_DIRECT`` append then writes a tensor that is
    block-aligned in memory too straight from its buffer (``appender``); smaller tensors
    are packed as usual. Readers need nothing new: they go by the offsets the header
    lists, and JSON allows trailing spaces.

    Where the tensors are all views into one buffer, and the stretch of it that holds them
    starts on a block (a step's tensors as received: one request body, its tensor data
    placed on a page), a block-aligned frame's data is that stretch as it is, each tensor
    at its place in it: one write from the buffer, however many tensors, and none of them
    copied to be aligned (:func:`mirrored`).
    """
    groups = [("g", event.grads), ("p", event.params or {})]
    named = [(group, name, array) for group, arrays in groups for name, array in arrays.items()]
    stretch = mirrored([array for _, _, array in named]) if block_aligned else None
    if stretch is None:
        tensors, body, offset = _packed(named, block_aligned)
    else:
        tensors, body, offset = _as_placed(named, *stretch)
    header = json.dumps(
        {
            "session": session,
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
    if block_aligned:
        header += b" " * (-(PREFIX_SIZE + len(header)) % BLOCK)
    return Unsealed(header, body, offset)


Named = list[tuple[str, str, np.ndarray]]
"""An event's tensors in frame order: group ("g" or "p"), name, array."""


def _entry(group: str, name: str, array: np.ndarray, offset: int) -> list[Any]:
    dtype = np.dtype(array.dtype).newbyteorder("<").str
    return [group, name, dtype, list(array.shape), offset, array.nbytes]


def _packed(named: Named, block_aligned: bool) -> tuple[list[list[Any]], list[Any], int]:
    """The tensor table, data buffers and data length of tensors one after another, each
    padded to 8 (and, ``block_aligned``, each of a block or more starting on one)."""
    tensors: list[list[Any]] = []
    body: list[bytes | memoryview] = []
    offset = 0
    for group, name, array in named:
        raw = _raw(array)
        gap = -offset % BLOCK if block_aligned and raw.nbytes >= BLOCK else 0
        if gap:
            body.append(_BLOCK_ZEROS[:gap])
            offset += gap
        tensors.append(_entry(group, name, array, offset))
        body.append(raw)
        pad = _ZEROS[: _pad(raw.nbytes)]
        if pad:
            body.append(pad)
        offset += raw.nbytes + len(pad)
    return tensors, body, offset


def _as_placed(
    named: Named, data: memoryview, offsets: list[int]
) -> tuple[list[list[Any]], list[Any], int]:
    """:func:`_packed`'s result for tensors that ``data`` holds at ``offsets``."""
    tensors = [_entry(g, n, a, at) for (g, n, a), at in zip(named, offsets, strict=True)]
    pad = _ZEROS[: _pad(data.nbytes)]
    return tensors, [data, pad], data.nbytes + len(pad)


def mirrored(arrays: Sequence[np.ndarray]) -> tuple[memoryview, list[int]] | None:
    """The stretch of one buffer that holds all of ``arrays`` and starts on a block, and
    each array's offset in it; None unless they are all C-contiguous, little-endian views
    of the same buffer (the same exporter: a request body's), each at an offset that is a
    multiple of its item size (so that a reader's views of it are aligned)."""
    if not arrays:
        return None
    owner: Any = None
    starts: list[int] = []
    for array in arrays:
        root = _exporter(array)
        if root is None or (owner is not None and root is not owner):
            return None
        if not array.flags.c_contiguous or array.dtype.byteorder == ">":
            return None
        owner = root
        starts.append(int(array.ctypes.data))
    try:
        whole = np.frombuffer(memoryview(owner).cast("B"), dtype=np.uint8)
    except (TypeError, ValueError):
        return None
    base = int(whole.ctypes.data)
    low = min(starts)
    high = max(at + a.nbytes for at, a in zip(starts, arrays, strict=True))
    if low % BLOCK or low < base or high > base + whole.nbytes:
        return None
    offsets = [at - low for at in starts]
    if any(at % a.itemsize for at, a in zip(offsets, arrays, strict=True)):
        return None
    return whole[low - base : high - base].data, offsets


def _exporter(array: np.ndarray) -> object | None:
    """What a view's memory belongs to: the object a buffer view of it was taken from."""
    root: object = array
    while isinstance(root, np.ndarray) and root.base is not None:
        root = root.base
    if isinstance(root, memoryview):
        return root.obj
    return None


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
    """What reading a log file found: its whole events and how the file ends after them."""

    events: list[Event]
    """The intact frames from the start of the file, up to the first bad one."""
    valid_bytes: int
    """Where the next frame goes: the block boundary after the last whole frame."""
    torn: bool
    """True when the bytes after ``valid_bytes`` are one interrupted write (may be cut)."""
    damage: str | None = None
    """Why the bytes after ``valid_bytes`` are not a torn write; None if they are, or
    if there are none."""
    beyond: tuple[Event, ...] = ()
    """Intact frames found after the damaged part (their events cannot be replayed, but
    they say what was acknowledged)."""

    @property
    def clean(self) -> bool:
        return not self.torn and self.damage is None


def scan(data: np.ndarray, session: str | None = None) -> Scan:
    """Parse frames from a log file's bytes (a uint8 array) up to the first bad one, and
    say how the file ends after them. With ``session``, a frame of another session is
    damage."""
    events: list[Event] = []
    pos = 0
    end = data.size
    buf = data.data
    while pos < end:
        found = _frame_at(data, buf, pos, end)
        if not isinstance(found, tuple):
            break
        event, size, owner = found
        if session is not None and owner != session:
            return _damaged(
                data, buf, pos, end, events, f"record at byte {pos} is of session {owner!r}"
            )
        events.append(event)
        pos += size
    if pos >= end or not data[pos:end].any():
        # Zeros after the last frame are room written ahead for the next ones.
        return Scan(events, pos, False)
    why = _not_torn(data, buf, pos, end)
    if why is None and not _intact_after(data, buf, pos, end):
        return Scan(events, pos, True)
    return _damaged(data, buf, pos, end, events, why or f"record at byte {pos} is unreadable")


def _damaged(
    data: np.ndarray, buf: memoryview, pos: int, end: int, events: list[Event], why: str
) -> Scan:
    beyond: list[Event] = []
    at = aligned(pos + 1)
    while at < end:
        found = _frame_at(data, buf, at, end)
        if isinstance(found, tuple):
            beyond.append(found[0])
            at += found[1]
        else:
            at += BLOCK
    if beyond:
        why += f"; {len(beyond)} intact records follow it"
    return Scan(events, pos, False, why, tuple(beyond))


def _not_torn(data: np.ndarray, buf: memoryview, pos: int, end: int) -> str | None:
    """Why the bytes from ``pos`` on cannot be an interrupted final append (None if they
    can): a write cut short leaves fewer bytes than its frame declares, or sectors of
    zeros that never reached the disk, and nothing after its own frame."""
    if pos + PREFIX_SIZE > end:
        return None
    magic, header_len, data_len, _ = _PREFIX.unpack_from(buf, pos)
    if magic != MAGIC:
        if not data[pos : min(pos + SECTOR, end)].any():
            return None
        return f"bytes at {pos} are not a record"
    if header_len > MAX_HEADER:
        return f"record at byte {pos} declares an impossible header length"
    frame_end = pos + PREFIX_SIZE + header_len + _pad(header_len) + data_len
    if frame_end >= end:
        return None
    if aligned(frame_end) < end and data[aligned(frame_end) : end].any():
        return f"record at byte {pos} is followed by more data"
    for sector in range(pos, frame_end, SECTOR):
        if not data[sector : min(sector + SECTOR, frame_end)].any():
            return None
    return f"record at byte {pos} fails its checksum"


def _intact_after(data: np.ndarray, buf: memoryview, pos: int, end: int) -> bool:
    at = aligned(pos + 1)
    while at < end:
        if isinstance(_frame_at(data, buf, at, end), tuple):
            return True
        at += BLOCK
    return False


def _frame_at(
    data: np.ndarray, buf: memoryview, pos: int, end: int
) -> tuple[Event, int, str] | None:
    """The intact frame at ``pos``: its event, its size with padding, its session."""
    if pos + PREFIX_SIZE > end:
        return None
    magic, header_len, data_len, check = _PREFIX.unpack_from(buf, pos)
    if magic != MAGIC or header_len > MAX_HEADER:
        return None
    head_start = pos + PREFIX_SIZE
    data_start = head_start + header_len + _pad(header_len)
    frame_end = data_start + data_len
    if frame_end > end:
        return None
    if checksum.digest([buf[pos + 4 : pos + 16], buf[head_start:frame_end]]) != check:
        return None
    try:
        header = json.loads(bytes(buf[head_start : head_start + header_len]))
        event = _decode(header, data, data_start)
        owner = str(header["session"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return event, aligned(frame_end) - pos, owner


def _decode(header: dict[str, Any], data: np.ndarray, data_start: int) -> Event:
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

"""What goes into a row and comes back out: event frames, snapshot chunks, checksums.

An event is stored as exactly the frame the disk log writes for it (``logfile.encode``:
a JSON header and the tensors' raw bytes, with its own CRC), so both stores hold the same
bytes and replay decodes them with the same code. Each row adds a CRC-32 of the whole
value, checked before anything is decoded. Snapshots are the safetensors checkpoint the
disk store writes, cut into :data:`CHUNK_BYTES` pieces (a bytea value is limited to 1 GB,
and smaller pieces keep the client's and the server's buffers small).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from service.codec import safetensors
from service.codec.errors import MalformedBody
from service.sessions.store import logfile
from service.sessions.store.base import DamagedSession, Event, Snapshot

CHUNK_BYTES = 64 << 20
_SEQ_KEY = "optserve.store.seq"
_AT_KEY = "optserve.store.at"


def checksum(data: bytes | memoryview) -> int:
    return zlib.crc32(data)


def event_frame(event: Event) -> bytes:
    return b"".join(logfile.encode(event))


def _aligned_copy(data: bytes) -> np.ndarray:
    # Tensors are decoded as views: give them a writable, aligned buffer of their own.
    out = np.empty(len(data), dtype=np.uint8)
    out[:] = np.frombuffer(data, dtype=np.uint8)
    return out


def decode_event(session_id: str, seq: int, frame: bytes, stored_checksum: int) -> Event:
    if checksum(frame) != stored_checksum:
        raise DamagedSession(session_id, f"event {seq} fails its checksum")
    scan = logfile.scan(_aligned_copy(frame))
    if scan.torn or len(scan.events) != 1:
        raise DamagedSession(session_id, f"event {seq} is not one whole frame")
    event = scan.events[0]
    if event.seq != seq:
        raise DamagedSession(session_id, f"the row of event {seq} holds event {event.seq}")
    return event


def snapshot_bytes(snapshot: Snapshot) -> bytes:
    metadata = {**snapshot.metadata, _SEQ_KEY: str(snapshot.seq), _AT_KEY: repr(snapshot.at)}
    return safetensors.encode(snapshot.arrays, metadata)


def chunks(data: bytes) -> Iterator[tuple[int, memoryview, int]]:
    """``(index, piece, checksum)`` for every chunk of ``data`` (one, empty, at least)."""
    view = memoryview(data)
    for index, start in enumerate(range(0, max(len(data), 1), CHUNK_BYTES)):
        piece = view[start : start + CHUNK_BYTES]
        yield index, piece, checksum(piece)


def decode_snapshot(session_id: str, seq: int, data: np.ndarray) -> Snapshot:
    try:
        arrays, metadata = safetensors.decode(data.data)
        stored_seq = int(metadata.pop(_SEQ_KEY))
        at = float(metadata.pop(_AT_KEY))
    except (MalformedBody, ValueError, KeyError) as exc:
        raise DamagedSession(session_id, f"snapshot {seq} does not decode ({exc})") from exc
    if stored_seq != seq:
        raise DamagedSession(session_id, f"the rows of snapshot {seq} hold snapshot {stored_seq}")
    return Snapshot(seq, arrays, metadata, at)

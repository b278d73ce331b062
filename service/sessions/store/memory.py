"""A store that keeps everything in process memory: for tests, benchmarks, ephemeral use.

With ``keep_history=True`` (the default) it behaves exactly like the disk store (one
contract test suite checks both), and opening it again after ``close`` finds what it
held, so a service can be "restarted" on it to exercise recovery without a disk.

With ``keep_history=False`` it keeps only the archived idempotency keys: nothing is
copied per snapshot and no event is retained, which is what a server running in memory
mode wants (it cannot restart into its old sessions anyway). ``load`` then finds nothing.

Archived keys are capped per session (:data:`MAX_ARCHIVED_KEYS`, oldest dropped first) to
keep memory bounded; the disk store keeps them all, on disk.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from service.sessions.store.base import (
    Event,
    KeyRecord,
    SessionRecord,
    Snapshot,
    Store,
    StoredSession,
)


@dataclass
class _Held:
    record: SessionRecord
    snapshots: list[Snapshot]
    events: list[Event] = field(default_factory=list)
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    last_seq: int = 0


def _copy_snapshot(snapshot: Snapshot) -> Snapshot:
    # The caller passes live state arrays; keep our own copy, as a disk write would.
    arrays = {name: np.array(a, copy=True) for name, a in snapshot.arrays.items()}
    return Snapshot(snapshot.seq, arrays, dict(snapshot.metadata), snapshot.at)


def _event_bytes(event: Event) -> int:
    arrays = [*event.grads.values(), *(event.params or {}).values()]
    return 256 + sum(a.nbytes for a in arrays)


MAX_ARCHIVED_KEYS = 100_000
"""Per session. A retry older than this many keyed steps is treated as a new step."""


class MemoryStore(Store):
    durable = False

    def __init__(self, *, keep_history: bool = True) -> None:
        self.keeps_history = keep_history
        self.keep_history = keep_history
        self._sessions: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._open = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    def ping(self) -> bool:
        return self._open

    def _held(self, session_id: str) -> _Held:
        with self._lock:
            held = self._sessions.get(session_id)
        if held is None:
            raise KeyError(f"no stored session {session_id!r}")
        return held

    def create(self, record: SessionRecord, snapshot: Snapshot) -> None:
        kept = [_copy_snapshot(snapshot)] if self.keep_history else []
        with self._lock:
            if record.id in self._sessions:
                raise KeyError(f"session {record.id!r} already stored")
            self._sessions[record.id] = _Held(record, kept, last_seq=snapshot.seq)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def records(self) -> list[SessionRecord]:
        with self._lock:
            held = list(self._sessions.values())
        return [h.record for h in sorted(held, key=lambda h: (h.record.created_at, h.record.id))]

    def load(self) -> Iterator[StoredSession]:
        if not self.keep_history:
            return
        with self._lock:
            held = list(self._sessions.values())
        for h in sorted(held, key=lambda h: (h.record.created_at, h.record.id)):
            yield self._stored(h)

    @staticmethod
    def _stored(held: _Held) -> StoredSession:
        base, *later = held.snapshots
        events = [e for e in held.events if e.seq > base.seq]
        return StoredSession(held.record, base, events, [s.seq for s in later])

    def load_session(self, session_id: str) -> StoredSession | None:
        with self._lock:
            held = self._sessions.get(session_id)
        if held is None or not self.keep_history:
            return None
        return self._stored(held)

    def append(self, session_id: str, event: Event) -> int:
        held = self._held(session_id)
        if event.seq != held.last_seq + 1:
            raise ValueError(f"event {event.seq} does not follow event {held.last_seq}")
        held.last_seq = event.seq
        if self.keep_history:
            held.events.append(event)
        return _event_bytes(event)

    def snapshot(self, session_id: str, snapshot: Snapshot) -> Callable[[], None]:
        held = self._held(session_id)
        if not self.keep_history:
            return lambda: None
        captured = _copy_snapshot(snapshot)

        def store() -> None:
            held.snapshots.append(captured)
            held.snapshots.sort(key=lambda s: s.seq)

        return store

    def compact(self, session_id: str, base_seq: int, keys: Sequence[KeyRecord]) -> None:
        held = self._held(session_id)
        if self.keep_history and not any(s.seq == base_seq for s in held.snapshots):
            raise ValueError(f"no snapshot at event {base_seq}")
        for record in keys:
            held.keys[record.key] = record
        while len(held.keys) > MAX_ARCHIVED_KEYS:
            del held.keys[next(iter(held.keys))]
        held.snapshots = [s for s in held.snapshots if s.seq >= base_seq]
        held.events = [e for e in held.events if e.seq > base_seq]

    def find_key(self, session_id: str, key: str) -> KeyRecord | None:
        with self._lock:
            held = self._sessions.get(session_id)
        return None if held is None else held.keys.get(key)

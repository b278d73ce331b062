"""The durable store: per-session event logs and safetensors snapshots, SQLite for the rest.

Layout under the data directory::

    optserve.sqlite3                 session records and archived idempotency keys
    sessions/<id>/snap-<seq>.safetensors   the state after <seq> events (a checkpoint)
    sessions/<id>/log-<seq>.bin            the events after <seq>, one frame each

Why this shape (docs/storage.md has the measurements): a step's durable cost is one
append of its inputs plus one ``fdatasync``. The state itself (several times the size
of one gradient for Adam) is written only every so often, as a snapshot: written to a
temporary file, fsynced, renamed, and the directory fsynced, so a snapshot is either
whole or absent. SQLite holds what is small and must be queried (who owns a session,
which keys were used long ago); it is never on a step's path, because a commit there
costs as much as the append itself.

Commit points: a session exists once its SQLite row is committed (its directory with
the first snapshot is made durable before); an event exists once its frame is fsynced;
a snapshot exists once it is renamed into place with the directory fsynced. Whatever a
crash leaves outside these (a directory without a row, a ``.tmp`` file, a torn frame at
the end of a log) is removed or truncated on the next start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.codec import safetensors
from service.codec.errors import MalformedBody
from service.sessions.store import appender, logfile
from service.sessions.store.base import (
    Event,
    KeyRecord,
    SessionRecord,
    Snapshot,
    Store,
    StoredSession,
)

log = logging.getLogger(__name__)

DB_NAME = "optserve.sqlite3"
LOCK_NAME = "lock"
SESSIONS_DIR = "sessions"
_SEQ_KEY = "optserve.store.seq"
_AT_KEY = "optserve.store.at"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    config TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    session TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    step INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (session, key)
) WITHOUT ROWID;
"""


def _snap_name(seq: int) -> str:
    return f"snap-{seq:020d}.safetensors"


def _log_name(seq: int) -> str:
    return f"log-{seq:020d}.bin"


def _seqs(directory: Path, prefix: str, suffix: str) -> list[int]:
    found = []
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(suffix):
            middle = entry[len(prefix) : -len(suffix)]
            if middle.isdigit():
                found.append(int(middle))
    return sorted(found)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        logfile.write_all(fd, [data])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


class DataDirInUse(RuntimeError):
    """Another process (or another open store) holds the data directory."""

    def __init__(self, root: Path) -> None:
        super().__init__(f"data directory {root} is in use by another optserve process")
        self.root = root


@dataclass
class _Log:
    """The segment a session appends to."""

    fd: int
    direct: bool
    """Whether appends bypass the page cache (``O_DIRECT``)."""
    start: int
    size: int
    last_seq: int
    last_size: int = -1
    """The size before the last append (what ``retract`` truncates to); -1 if unknown."""


class DiskStore(Store):
    durable = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._sessions_dir = self.root / SESSIONS_DIR
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        self._logs_lock = threading.Lock()
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        self._sessions_dir.mkdir(parents=True, exist_ok=True)
        self._lock_root()
        db = sqlite3.connect(self.root / DB_NAME, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        self._remove_debris()

    def close(self) -> None:
        with self._logs_lock:
            for entry in self._logs.values():
                os.close(entry.fd)
            self._logs.clear()
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _lock_root(self) -> None:
        """Refuse to share the data directory: two writers would corrupt each other.

        The lock is the kernel's, so it goes with the process however it ends (a SIGKILL
        included) and a restarted server takes it again at once.
        """
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirInUse(self.root) from None
        self._lock_fd = fd

    def ping(self) -> bool:
        try:
            with self._db_lock:
                if self._db is None:
                    return False
                self._db.execute("SELECT 1").fetchone()
            return os.access(self._sessions_dir, os.W_OK)
        except (sqlite3.Error, OSError):
            return False

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the store is not open")
        return self._db

    def _remove_debris(self) -> None:
        """Undo what a crash left half-done: sessions without a row, rows without data."""
        with self._db_lock:
            ids = {row[0] for row in self._conn().execute("SELECT id FROM sessions")}
        for entry in os.listdir(self._sessions_dir):
            path = self._sessions_dir / entry
            if entry not in ids:
                shutil.rmtree(path, ignore_errors=True)
                continue
            for name in os.listdir(path):
                if name.endswith(".tmp"):
                    os.unlink(path / name)
        for session_id in ids:
            directory = self._sessions_dir / session_id
            if not directory.is_dir() or not _seqs(directory, "snap-", ".safetensors"):
                log.error("session %s has no stored state; forgetting it", session_id)
                self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        with self._db_lock:
            db = self._conn()
            db.execute("BEGIN")
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            db.execute("DELETE FROM keys WHERE session = ?", (session_id,))
            db.execute("COMMIT")

    # -- sessions ----------------------------------------------------------------------

    def create(self, record: SessionRecord, snapshot: Snapshot) -> None:
        directory = self._sessions_dir / record.id
        with self._db_lock:
            exists = (
                self._conn().execute("SELECT 1 FROM sessions WHERE id = ?", (record.id,)).fetchone()
            )
        if exists:
            raise KeyError(f"session {record.id!r} already stored")
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        write_durably(directory / _snap_name(snapshot.seq), _encode_snapshot(snapshot))
        fd, direct = self._new_segment(directory, snapshot.seq)
        fsync_dir(self._sessions_dir)
        try:
            with self._db_lock:
                self._conn().execute(
                    "INSERT INTO sessions (id, tenant, config, labels, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.tenant,
                        json.dumps(record.config),
                        json.dumps(record.labels),
                        record.created_at,
                    ),
                )
        except BaseException:
            os.close(fd)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        with self._logs_lock:
            self._logs[record.id] = _Log(fd, direct, snapshot.seq, 0, snapshot.seq)

    def delete(self, session_id: str) -> None:
        self._forget(session_id)
        with self._logs_lock:
            entry = self._logs.pop(session_id, None)
        if entry is not None:
            os.close(entry.fd)
        shutil.rmtree(self._sessions_dir / session_id, ignore_errors=True)

    def load(self) -> Iterator[StoredSession]:
        with self._db_lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT id, tenant, config, labels, created_at FROM sessions "
                    "ORDER BY created_at, id"
                )
                .fetchall()
            )
        for row in rows:
            loaded = self._load_one(_record(row))
            if loaded is not None:
                yield loaded

    def load_session(self, session_id: str) -> StoredSession | None:
        with self._db_lock:
            row = (
                self._conn()
                .execute(
                    "SELECT id, tenant, config, labels, created_at FROM sessions WHERE id = ?",
                    (session_id,),
                )
                .fetchone()
            )
        if row is None:
            return None
        return self._load_one(_record(row))

    def _load_one(self, record: SessionRecord) -> StoredSession | None:
        directory = self._sessions_dir / record.id
        snaps = _seqs(directory, "snap-", ".safetensors")
        segments = _seqs(directory, "log-", ".bin")
        base: Snapshot | None = None
        for seq in snaps:
            # The base must be followed by its own segment (or be the newest snapshot):
            # a compaction cut short may have removed older segments but not snapshots.
            if seq not in segments and seq != snaps[-1]:
                continue
            try:
                base = _decode_snapshot(directory / _snap_name(seq))
            except (OSError, MalformedBody, ValueError, KeyError) as exc:
                log.error("session %s: snapshot %d unreadable (%s)", record.id, seq, exc)
                continue
            break
        if base is None:
            log.error("session %s: no readable snapshot; skipping it", record.id)
            return None
        events: list[Event] = []
        expected = base.seq + 1
        chain = [s for s in segments if s >= base.seq]
        if not chain or chain[0] != base.seq:
            os.close(self._new_segment(directory, base.seq)[0])
            chain.insert(0, base.seq)
        last_segment, last_size = chain[0], 0
        for i, start in enumerate(chain):
            path = directory / _log_name(start)
            found = logfile.scan(logfile.read_file(path))
            good = found.events
            ok = start == expected - 1 and all(e.seq == expected + k for k, e in enumerate(good))
            if not ok:
                log.error("session %s: log %s does not continue the history", record.id, path)
                self._drop_segments(directory, chain[i:])
                break
            events.extend(good)
            expected += len(good)
            last_segment, last_size = start, found.valid_bytes
            if found.torn:
                # The tail never completed, so it was never acknowledged: cut it off.
                log.warning("session %s: dropping a torn record at the end of %s", record.id, path)
            if found.torn or path.stat().st_size != found.valid_bytes:
                os.truncate(path, found.valid_bytes)
                _fsync_file(path)
            if found.torn:
                self._drop_segments(directory, chain[i + 1 :])
                break
        fd, direct = appender.open_log(directory / _log_name(last_segment), create=False)
        with self._logs_lock:
            old = self._logs.pop(record.id, None)
            if old is not None:
                os.close(old.fd)
            self._logs[record.id] = _Log(fd, direct, last_segment, last_size, expected - 1)
        later = [s for s in snaps if s > base.seq]
        return StoredSession(record, base, events, later)

    def _drop_segments(self, directory: Path, starts: Sequence[int]) -> None:
        for start in starts:
            if (directory / _log_name(start)).exists():
                log.error("removing log segment %s after a gap", directory / _log_name(start))
                os.unlink(directory / _log_name(start))
        if starts:
            fsync_dir(directory)

    # -- history -----------------------------------------------------------------------

    def _log(self, session_id: str) -> _Log:
        with self._logs_lock:
            entry = self._logs.get(session_id)
        if entry is None:
            # Not loaded since open: loading finds the end of its log (and repairs it).
            self.load_session(session_id)
            with self._logs_lock:
                entry = self._logs.get(session_id)
        if entry is None:
            raise KeyError(f"no stored session {session_id!r}")
        return entry

    def _new_segment(self, directory: Path, start: int) -> tuple[int, bool]:
        opened = appender.open_log(directory / _log_name(start), create=True)
        fsync_dir(directory)
        return opened

    def append(self, session_id: str, event: Event) -> int:
        entry = self._log(session_id)
        if event.seq != entry.last_seq + 1:
            raise ValueError(f"event {event.seq} does not follow event {entry.last_seq}")
        buffers = logfile.encode(event)
        try:
            written = appender.append(entry.fd, entry.direct, entry.size, buffers)
        except BaseException:
            # Leave no partial frame behind for the next append to follow.
            os.ftruncate(entry.fd, entry.size)
            raise
        entry.last_size = entry.size
        entry.size += written
        entry.last_seq = event.seq
        return written

    def retract(self, session_id: str, seq: int) -> None:
        entry = self._log(session_id)
        if seq != entry.last_seq or entry.last_size < 0:
            raise ValueError(f"event {seq} is not the last one appended")
        os.ftruncate(entry.fd, entry.last_size)
        os.fdatasync(entry.fd)
        entry.size = entry.last_size
        entry.last_size = -1
        entry.last_seq = seq - 1

    def snapshot(self, session_id: str, snapshot: Snapshot) -> Callable[[], None]:
        entry = self._log(session_id)
        if snapshot.seq != entry.last_seq:
            raise ValueError(f"snapshot at {snapshot.seq} but the log ends at {entry.last_seq}")
        data = _encode_snapshot(snapshot)
        directory = self._sessions_dir / session_id
        # Events from now on go to a new segment that starts where the snapshot ends.
        fd, direct = self._new_segment(directory, snapshot.seq)
        with self._logs_lock:
            old = self._logs.get(session_id)
            self._logs[session_id] = _Log(fd, direct, snapshot.seq, 0, snapshot.seq)
        if old is not None:
            os.close(old.fd)

        def write() -> None:
            write_durably(directory / _snap_name(snapshot.seq), data)

        return write

    def compact(self, session_id: str, base_seq: int, keys: Sequence[KeyRecord]) -> None:
        directory = self._sessions_dir / session_id
        if not (directory / _snap_name(base_seq)).exists():
            raise ValueError(f"no snapshot at event {base_seq}")
        with self._db_lock:
            db = self._conn()
            db.execute("BEGIN")
            db.executemany(
                "INSERT OR REPLACE INTO keys (session, key, fingerprint, step, seq) "
                "VALUES (?, ?, ?, ?, ?)",
                [(session_id, k.key, k.fingerprint, k.step, k.seq) for k in keys],
            )
            db.execute("COMMIT")
        # Snapshots go first (and durably), so that a crash midway never leaves an old
        # snapshot whose following events are already gone.
        old_snaps = [s for s in _seqs(directory, "snap-", ".safetensors") if s < base_seq]
        for seq in old_snaps:
            os.unlink(directory / _snap_name(seq))
        if old_snaps:
            fsync_dir(directory)
        for start in _seqs(directory, "log-", ".bin"):
            if start < base_seq:
                os.unlink(directory / _log_name(start))

    def find_key(self, session_id: str, key: str) -> KeyRecord | None:
        with self._db_lock:
            row = (
                self._conn()
                .execute(
                    "SELECT fingerprint, step, seq FROM keys WHERE session = ? AND key = ?",
                    (session_id, key),
                )
                .fetchone()
            )
        return None if row is None else KeyRecord(key, row[0], row[1], row[2])


def _record(row: tuple[str, str, str, str, float]) -> SessionRecord:
    session_id, tenant, config, labels, created_at = row
    return SessionRecord(session_id, tenant, json.loads(config), json.loads(labels), created_at)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_snapshot(snapshot: Snapshot) -> bytes:
    metadata = {**snapshot.metadata, _SEQ_KEY: str(snapshot.seq), _AT_KEY: repr(snapshot.at)}
    return safetensors.encode(snapshot.arrays, metadata)


def _decode_snapshot(path: Path) -> Snapshot:
    arrays, metadata = safetensors.decode(logfile.read_file(path).data)
    seq = int(metadata.pop(_SEQ_KEY))
    at = float(metadata.pop(_AT_KEY))
    return Snapshot(seq, arrays, metadata, at)

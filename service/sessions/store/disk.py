"""The durable store: per-session event logs and safetensors snapshots, SQLite for the rest.

Layout under the data directory::

    optserve.sqlite3                 the catalog: an index of the session directories
    sessions/<id>/record             tenant, config, labels, creation time (checksummed)
    sessions/<id>/snap-<seq>.safetensors   the state after <seq> events (checksummed)
    sessions/<id>/log-<seq>.bin            the events after <seq>, one checksummed frame each
    sessions/<id>/keys               idempotency keys of compacted events (checksummed lines)
    quarantine/                      what ``optserve repair`` set aside

Why this shape (docs/storage.md has the measurements): a step's durable cost is one
append of its inputs plus one ``fdatasync``. The state itself (several times the size
of one gradient for Adam) is written only every so often, as a snapshot: written to a
temporary file, fsynced, renamed, and the directory fsynced, so a snapshot is either
whole or absent. SQLite holds what is small and must be queried (who owns a session,
which keys were used long ago); it is never on a step's path, because a commit there
costs as much as the append itself.

Commit points: a session exists once its directory (record, first snapshot, first
segment) is renamed from ``.creating-<id>`` to ``<id>`` and the parent fsynced; an event
exists once its frame is fsynced; a snapshot exists once it is renamed into place with
the directory fsynced. The session directories are the truth; SQLite is rebuilt from them
when it lacks a session (or is lost). What a crash leaves outside the commit points (a
``.creating-`` directory, a ``.tmp`` file, a torn frame at the end of the newest segment)
is removed or cut on the next start; anything else that does not read back marks the
session damaged (``history``), and its files are left exactly as they are.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from service.sessions.store import appender, history, logfile
from service.sessions.store.aio import DirectWrite
from service.sessions.store.base import (
    Event,
    KeyRecord,
    PreparedAppend,
    SessionRecord,
    Snapshot,
    Store,
    StoredSession,
)
from service.sessions.store.history import History, log_name, seqs, snap_name

log = logging.getLogger("optserve.store")

DB_NAME = "optserve.sqlite3"
LOCK_NAME = "lock"
SESSIONS_DIR = "sessions"
QUARANTINE_DIR = "quarantine"
CREATING = ".creating-"
"""Prefix of a session directory being created: never acknowledged, removed on start."""
REPAIRING = ".repairing-"
"""Prefix of a session directory being rebuilt by a repair, swapped in when whole."""

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


def data_dir_in_use(root: Path) -> bool:
    """Whether a process holds the data directory's lock now (a server started on it)."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also releases the lock if it was taken here
    return False


@dataclass
class _Log:
    """The segment a session appends to."""

    fd: int
    direct: bool
    """Whether appends bypass the page cache (``O_DIRECT``)."""
    start: int
    size: int
    last_seq: int
    reserved: int = 0
    """The end of the blocks reserved for appends (``appender.reserve``)."""
    zeroed: int = 0
    """The end of the written zeros past the last frame (``appender.zeros_ahead``)."""
    staging: appender.Staging = field(default_factory=appender.Staging)
    """Where frames written by an asynchronous request wait for it."""
    zeroing: Future[None] | None = None
    """Zeros being written past the end in the background (:meth:`zero_ahead`); waited for
    (:meth:`settle`) before the log is written, cut or closed."""

    def appended(self, seq: int, written: int) -> int:
        """Record a frame of ``written`` bytes, event ``seq``, as durable."""
        self.size += written
        self.last_seq = seq
        return written

    def make_room(self, frame: int) -> None:
        """Reserve blocks past the end for a frame of ``frame`` bytes, unless reserved
        blocks or written zeros are there already."""
        if self.size + frame > max(self.reserved, self.zeroed):
            self.reserved = appender.reserve(self.fd, self.size, frame)

    def zero_ahead(self, frame: int, background: ThreadPoolExecutor) -> None:
        """After a large frame of ``frame`` bytes: write zeros in the background until two
        more such frames fit in written blocks (one more each time, once under way), so
        that the next append overwrites blocks written before it."""
        end = self.size + 2 * frame
        if frame > appender.LARGE_ZEROS_MAX_FRAME or self.zeroed >= end:
            return
        start = max(self.size, self.zeroed)

        def zero() -> None:
            appender.write_zeros(self.fd, start, end - start)
            self.zeroed = end

        # The frame is durable already: a store closing meanwhile only means no zeros.
        with contextlib.suppress(RuntimeError):
            self.zeroing = background.submit(zero)

    def settle(self) -> None:
        """Wait for the zeros being written ahead, if any. Zeros still queued behind other
        logs' are not waited for but dropped: one session's append never waits on
        another's zeros. Dropped or failed, fewer zeros only mean that the next append
        reserves its blocks as it would have."""
        pending, self.zeroing = self.zeroing, None
        if pending is not None and not pending.cancel():
            with contextlib.suppress(Exception):
                pending.result()

    def cut(self) -> None:
        """Leave no partial frame behind for the next append to follow (this gives back
        the reserved blocks and written zeros too)."""
        self.settle()
        os.ftruncate(self.fd, self.size)
        self.reserved = min(self.reserved, self.size)
        self.zeroed = min(self.zeroed, self.size)

    def close(self) -> None:
        self.settle()
        appender.release(self.fd, self.size)
        os.close(self.fd)


_CHECKSUM_THREADS = 2
"""Checksums of large frames computed at once (one per session appending one)."""


@dataclass(frozen=True)
class _Pools:
    """The store's own threads, beside the runtime's."""

    zeros: ThreadPoolExecutor
    """Writes zeros ahead of logs of large frames (``_Log.zero_ahead``)."""
    checksums: ThreadPoolExecutor
    """Checksums large frames while their tensors are written (``_head_last``)."""

    def close(self) -> None:
        self.checksums.shutdown(wait=True)
        self.zeros.shutdown(wait=True)


def _head_last(
    entry: _Log,
    event: Event,
    frame_parts: logfile.Unsealed,
    pools: _Pools,
) -> PreparedAppend:
    """A block-aligned frame written in two parts: its tensors (``ahead``), then its head
    with the ``fdatasync``. Until its head is written the frame is not there: the blocks
    where it starts are still unwritten (the log's end, or its reserved blocks) or zeros
    written ahead, which read alike, and a scan after a crash in between finds a torn
    final write. A frame not appended after all is cut off again (``abandon``). Once it is
    appended, zeros for the next frames are written in the background
    (:meth:`_Log.zero_ahead`).

    The tensors' write starts before the checksum the head holds is known: the checksum
    is computed on another thread meanwhile (it reads the same bytes as the device does,
    4 MB in 0.4-0.6 ms here, and the write would otherwise wait for it)."""
    head = frame_parts.head_bytes
    body_views, body = appender.frame_views(frame_parts.body)
    start = entry.size
    frame = appender.aligned(head + body)
    written_ahead = False
    check: Future[int] | None = None

    def ahead() -> None:
        nonlocal written_ahead, check
        check = pools.checksums.submit(frame_parts.checksum)
        entry.make_room(frame)
        try:
            appender.write_views(entry.fd, True, start + head, body_views, body)
        except BaseException:
            entry.cut()
            raise
        written_ahead = True

    def write() -> int:
        if not written_ahead:
            ahead()
        assert check is not None
        try:
            head_views, _ = appender.frame_views(frame_parts.head(check.result()))
            appender.append_views(entry.fd, True, start, head_views, head)
        except BaseException:
            entry.cut()
            raise
        written = entry.appended(event.seq, frame)
        entry.zero_ahead(frame, pools.zeros)
        return written

    return PreparedAppend(write, ahead=ahead, abandon=entry.cut)


class DiskStore(Store):
    durable = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._sessions_dir = self.root / SESSIONS_DIR
        self._db: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        self._logs_lock = threading.Lock()
        self._pools = _Pools(
            ThreadPoolExecutor(1, thread_name_prefix="optserve-zeros"),
            ThreadPoolExecutor(_CHECKSUM_THREADS, thread_name_prefix="optserve-checksum"),
        )
        self._lock_fd: int | None = None
        self.unlisted: dict[str, str] = {}
        """Session directories the catalog lacks and cannot take in, and why."""
        self.restored: list[str] = []
        """Sessions the catalog lacked on open and took back in from their directories."""

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
                entry.close()
            self._logs.clear()
        self._pools.close()
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
        """Undo what a crash left half-done, and make the catalog know every session.

        A ``.creating-`` directory is a create that never committed (it was never
        answered); a ``.repairing-`` one is a repair cut short, finished or dropped. A
        session directory the catalog lacks (the database was lost, or a crash came
        between the directory's commit and the row's) is added back from its record
        file, with its archived keys: a session directory is never removed for it.
        """
        with self._db_lock:
            ids = {row[0] for row in self._conn().execute("SELECT id FROM sessions")}
        for entry in sorted(os.listdir(self._sessions_dir)):
            path = self._sessions_dir / entry
            if entry.startswith(CREATING):
                shutil.rmtree(path, ignore_errors=True)
                continue
            if entry.startswith(REPAIRING):
                self._finish_repair(entry[len(REPAIRING) :])
                continue
            if not path.is_dir():
                continue
            for name in os.listdir(path):
                if name.endswith(".tmp"):
                    os.unlink(path / name)
            if entry not in ids:
                self._add_to_catalog(entry, path)

    def _add_to_catalog(self, session_id: str, directory: Path) -> None:
        try:
            record = history.read_record(directory, session_id)
        except history.Damaged as exc:
            # Without its record the tenant is unknown: keep it for check and repair.
            self.unlisted[session_id] = str(exc)
            log.error(
                "session directory is not in the catalog and cannot be added back",
                extra={"session": session_id, "damage": str(exc)},
            )
            return
        keys, _ = history.read_keys(directory)
        self._insert(record, keys)
        self.restored.append(session_id)
        log.warning(
            "session was missing from the catalog; added back from its directory",
            extra={"session": session_id, "archived_keys": len(keys)},
        )

    def _insert(self, record: SessionRecord, keys: Sequence[KeyRecord] = ()) -> None:
        with self._db_lock:
            db = self._conn()
            db.execute("BEGIN")
            db.execute(
                "INSERT OR REPLACE INTO sessions (id, tenant, config, labels, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                record.catalog_row(),
            )
            db.executemany(
                "INSERT OR REPLACE INTO keys (session, key, fingerprint, step, seq) "
                "VALUES (?, ?, ?, ?, ?)",
                [(record.id, k.key, k.fingerprint, k.step, k.seq) for k in keys],
            )
            db.execute("COMMIT")

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
        if exists or directory.exists():
            raise KeyError(f"session {record.id!r} already stored")
        building = self._sessions_dir / (CREATING + record.id)
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        try:
            write_durably(building / history.RECORD_NAME, history.encode_record(record))
            write_durably(
                building / snap_name(snapshot.seq),
                history.encode_snapshot(snapshot, record.id),
            )
            os.close(self._new_segment(building, snapshot.seq)[0])
            # The commit point: the whole directory appears at once.
            os.rename(building, directory)
            fsync_dir(self._sessions_dir)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        try:
            self._insert(record)
        except BaseException:
            # Not acknowledged: take the session back rather than leave it half known.
            shutil.rmtree(directory, ignore_errors=True)
            raise
        fd, direct = appender.open_log(directory / log_name(snapshot.seq), create=False)
        with self._logs_lock:
            self._logs[record.id] = _Log(fd, direct, snapshot.seq, 0, snapshot.seq)

    def delete(self, session_id: str) -> None:
        self._forget(session_id)
        with self._logs_lock:
            entry = self._logs.pop(session_id, None)
        if entry is not None:
            entry.settle()  # no zeros may go to the descriptor once it is reused
            os.close(entry.fd)
        shutil.rmtree(self._sessions_dir / session_id, ignore_errors=True)

    def _rows(self, session_id: str | None = None) -> list[SessionRecord]:
        query = "SELECT id, tenant, config, labels, created_at FROM sessions"
        with self._db_lock:
            if session_id is None:
                rows = self._conn().execute(query + " ORDER BY created_at, id").fetchall()
            else:
                rows = self._conn().execute(query + " WHERE id = ?", (session_id,)).fetchall()
        return [SessionRecord.from_catalog_row(row) for row in rows]

    def records(self) -> list[SessionRecord]:
        return self._rows()

    def session_ids_of(self, tenant: str, after: str | None, limit: int) -> list[str]:
        query = "SELECT id FROM sessions WHERE tenant = ? AND id > ? ORDER BY id LIMIT ?"
        with self._db_lock:
            rows = self._conn().execute(query, (tenant, after or "", limit)).fetchall()
        return [str(row[0]) for row in rows]

    def load(self) -> Iterator[StoredSession]:
        for record in self._rows():
            yield self._load_one(record)

    def load_session(self, session_id: str) -> StoredSession | None:
        rows = self._rows(session_id)
        return self._load_one(rows[0]) if rows else None

    def inspect(self, session_id: str) -> History:
        """Read one session back and verify everything, changing nothing."""
        rows = self._rows(session_id)
        return history.read(self._sessions_dir / session_id, session_id, rows[0] if rows else None)

    def session_ids(self) -> list[str]:
        """Every session: the catalog's, then directories it could not take in."""
        listed = [r.id for r in self._rows()]
        return listed + sorted(set(self.unlisted) - set(listed))

    def _load_one(self, record: SessionRecord) -> StoredSession:
        directory = self._sessions_dir / record.id
        found = history.read(directory, record.id, record)
        for problem in found.problems:
            log.error(
                "damaged file not needed by the session's history; left as it is",
                extra={"session": record.id, "damage": problem},
            )
        keys = [
            KeyRecord(e.key, e.fingerprint, e.seq, e.seq)
            for e in found.earlier
            if e.key is not None
        ]
        if found.damage is not None or found.base is None:
            log.error(
                "session is damaged: its steps and reads are refused until it is repaired",
                extra={"session": record.id, "damage": found.damage},
            )
            return StoredSession(
                record, found.base, found.events, [], keys, found.damage or "no state"
            )
        base = found.base
        if found.torn is not None:
            start, valid = found.torn
            path = directory / log_name(start)
            # The tail never completed, so it was never acknowledged: cut it off.
            log.warning(
                "dropping a torn record at the end of the newest log segment",
                extra={"session": record.id, "segment": path.name, "offset": valid},
            )
            os.truncate(path, valid)
            _fsync_file(path)
        if found.needs_segment:
            os.close(self._new_segment(directory, base.seq)[0])
        last_segment = max(s for s in seqs(directory, "log-", ".bin") if s >= base.seq)
        file_size = (directory / log_name(last_segment)).stat().st_size
        # Past the last frame the file holds zeros (written ahead, or a torn tail just cut).
        scanned = [seg for seg in found.segments if seg.start == last_segment]
        size = min(file_size, scanned[0].scan.valid_bytes) if scanned else file_size
        fd, direct = appender.open_log(directory / log_name(last_segment), create=False)
        with self._logs_lock:
            old = self._logs.pop(record.id, None)
            if old is not None:
                old.close()
            self._logs[record.id] = _Log(
                fd, direct, last_segment, size, found.last_seq, zeroed=file_size
            )
        return StoredSession(record, base, found.events, found.later_snapshots, keys)

    # -- repair ------------------------------------------------------------------------

    def rewrite(
        self,
        session_id: str,
        base: Snapshot,
        events: Sequence[Event],
        keys: Sequence[KeyRecord],
    ) -> Path:
        """Replace a session's history by ``base`` and ``events`` (an operator's repair).

        The new directory is built aside and swapped in; the old one is moved, whole, to
        ``quarantine/`` (returned), never deleted. ``keys`` are archived with it: the
        keys of every stored event the new history does not replay.
        """
        rows = self._rows(session_id)
        directory = self._sessions_dir / session_id
        record = rows[0] if rows else history.read_record(directory, session_id)
        building = self._sessions_dir / (REPAIRING + session_id)
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        write_durably(building / history.RECORD_NAME, history.encode_record(record))
        write_durably(building / snap_name(base.seq), history.encode_snapshot(base, session_id))
        fd, direct = self._new_segment(building, base.seq)
        try:
            offset = 0
            for event in events:
                offset += appender.append(fd, direct, offset, logfile.encode(event, session_id))
        finally:
            os.close(fd)
        if keys:
            write_durably(building / history.KEYS_NAME, history.encode_keys(list(keys)))
        with self._logs_lock:
            old = self._logs.pop(session_id, None)
        if old is not None:
            old.close()
        quarantine = self.root / QUARANTINE_DIR
        quarantine.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = quarantine / f"{session_id}-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = quarantine / f"{session_id}-{stamp}-{n}"
        if directory.exists():
            os.rename(directory, aside)
            fsync_dir(quarantine)
        self._finish_repair(session_id)
        with self._db_lock:
            self._conn().execute("DELETE FROM keys WHERE session = ?", (session_id,))
        self._insert(record, keys)
        self.unlisted.pop(session_id, None)
        return aside

    def _finish_repair(self, session_id: str) -> None:
        """Swap a rebuilt directory in, once the damaged one has been moved aside."""
        building = self._sessions_dir / (REPAIRING + session_id)
        directory = self._sessions_dir / session_id
        if directory.exists():
            # The repair did not get to move the old directory aside: it is untouched.
            shutil.rmtree(building, ignore_errors=True)
            return
        os.rename(building, directory)
        fsync_dir(self._sessions_dir)

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
        opened = appender.open_log(directory / log_name(start), create=True)
        fsync_dir(directory)
        return opened

    def append(self, session_id: str, event: Event) -> int:
        return self.prepare_append(session_id, event).write()

    def prepare_append(
        self, session_id: str, event: Event, asynchronous: bool = False
    ) -> PreparedAppend:
        entry = self._log(session_id)
        entry.settle()
        if event.seq != entry.last_seq + 1:
            raise ValueError(f"event {event.seq} does not follow event {entry.last_seq}")
        # A large frame is written from a thread with O_DIRECT: laid out block-aligned,
        # its tensors go to the device from the request's buffer, not through staging.
        if entry.direct and event.tensor_bytes > appender.ZEROS_AHEAD_MAX_FRAME:
            return _head_last(entry, event, logfile.layout(event, session_id, True), self._pools)
        buffers = logfile.encode(event, session_id)
        views, total = appender.frame_views(buffers)
        frame = appender.aligned(total)
        direct = None
        if asynchronous and entry.direct and entry.size + frame <= entry.zeroed:
            entry.staging.fill(views, frame)
            direct = DirectWrite(
                entry.fd,
                entry.staging.address,
                frame,
                entry.size,
                finish=lambda: entry.appended(event.seq, frame),
                abandon=entry.cut,
            )

        def write() -> int:
            # Past the written zeros, this append writes the next stretch of them.
            zeros = 0 if entry.size + frame <= entry.zeroed else appender.zeros_ahead(frame)
            if not zeros:
                entry.make_room(frame)
            try:
                written = appender.append_views(
                    entry.fd, entry.direct, entry.size, views, total, zeros
                )
            except BaseException:
                entry.cut()
                raise
            if zeros:
                entry.zeroed = entry.size + written + zeros
            return entry.appended(event.seq, written)

        return PreparedAppend(write, direct)

    def snapshot(self, session_id: str, snapshot: Snapshot) -> Callable[[], None]:
        entry = self._log(session_id)
        if snapshot.seq != entry.last_seq:
            raise ValueError(f"snapshot at {snapshot.seq} but the log ends at {entry.last_seq}")
        data = history.encode_snapshot(snapshot, session_id)
        directory = self._sessions_dir / session_id
        # Events from now on go to a new segment that starts where the snapshot ends.
        fd, direct = self._new_segment(directory, snapshot.seq)
        with self._logs_lock:
            old = self._logs.get(session_id)
            self._logs[session_id] = _Log(fd, direct, snapshot.seq, 0, snapshot.seq)
        if old is not None:
            old.close()

        def write() -> None:
            write_durably(directory / snap_name(snapshot.seq), data)

        return write

    def compact(self, session_id: str, base_seq: int, keys: Sequence[KeyRecord]) -> None:
        directory = self._sessions_dir / session_id
        if not (directory / snap_name(base_seq)).exists():
            raise ValueError(f"no snapshot at event {base_seq}")
        if keys:
            # The keys go into the session's own directory first (so that the catalog can
            # be rebuilt from it), then into the catalog, before their events are dropped.
            _append_line(directory / history.KEYS_NAME, history.encode_keys(list(keys)))
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
        old_snaps = [s for s in seqs(directory, "snap-", ".safetensors") if s < base_seq]
        for seq in old_snaps:
            os.unlink(directory / snap_name(seq))
        if old_snaps:
            fsync_dir(directory)
        for start in seqs(directory, "log-", ".bin"):
            if start < base_seq:
                os.unlink(directory / log_name(start))

    def archived_keys(self, session_id: str) -> list[KeyRecord]:
        """Every key the catalog archived for the session."""
        with self._db_lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT key, fingerprint, step, seq FROM keys WHERE session = ?", (session_id,)
                )
                .fetchall()
            )
        return [KeyRecord(*row) for row in rows]

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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_line(path: Path, line: bytes) -> None:
    """Append one checksummed line durably, after cutting an unfinished one."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = _end_of_last_line(fd, os.fstat(fd).st_size)
        os.ftruncate(fd, size)
        os.pwrite(fd, line, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _end_of_last_line(fd: int, size: int) -> int:
    """Where the last complete line ends (a compaction cut short leaves a partial one)."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        chunk = os.pread(fd, end - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0

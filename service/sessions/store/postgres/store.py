"""PostgreSQL as the system of record: many processes share one database.

Commit points: a session exists once its catalog row, its log row and its first
snapshot are committed (one transaction); an event exists once its row is committed
(``synchronous_commit`` as the database has it: ``on`` means on the server's disk); a
snapshot once its manifest and chunks are committed (one transaction). The store's
methods are synchronous and run on the caller's worker threads, each with a connection
from a :class:`~psycopg_pool.ConnectionPool` (autocommit: every fenced write is one
statement, its own transaction).

Fencing. The store remembers the leases it acquired, per session. An append is a single
statement that advances the session's head in ``session_logs`` and inserts the event,
and does so only if the head is the event's predecessor and that row still carries this
store's owner and epoch, unexpired by the database's clock (``clock_timestamp()``, read
when the row is checked, also after waiting for a concurrent writer's row lock). Lease
changes update the same row, so the database orders appends and takeovers of a session
strictly: a write made under an epoch that has been superseded finds zero rows and
raises :class:`~service.sessions.store.base.Fenced`. Retractions are fenced the same way;
snapshots and compaction check the lease when one is held (their content is derived
from events already committed, so they cannot make a stale owner's state acknowledged).

A write to a session whose lease this store does not hold takes one first, as
``owner`` with ``lease_ttl`` (so that single-process use, tools and tests need no lease
management); the session service acquires and renews leases itself.

Losing the database raises :class:`~service.sessions.store.base.StoreUnavailable`; the
pool replaces broken connections and reconnects once the database is back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from service.sessions.store.base import (
    DamagedSession,
    Event,
    Fenced,
    KeyRecord,
    SessionRecord,
    Snapshot,
    Store,
    StoredSession,
    StoreUnavailable,
    process_owner,
)
from service.sessions.store.leases import Leases
from service.sessions.store.policy import SnapshotPolicy
from service.sessions.store.postgres import rows, schema

log = logging.getLogger(__name__)

Conn = psycopg.Connection[TupleRow]

DEFAULT_LEASE_TTL = 10.0
_UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, PoolClosed)

_APPEND = """
WITH moved AS (
    UPDATE session_logs SET head = %(seq)s
    WHERE session_id = %(sid)s AND head = %(seq)s - 1
      AND owner = %(owner)s AND epoch = %(epoch)s AND expires_at > clock_timestamp()
    RETURNING session_id
)
INSERT INTO session_events (session_id, seq, kind, key, frame, checksum)
SELECT session_id, %(seq)s, %(kind)s, %(key)s, %(frame)b, %(checksum)s FROM moved
"""

_ACQUIRE = """
UPDATE session_logs
SET owner = %(owner)s, epoch = epoch + 1, wanted_by = NULL,
    expires_at = clock_timestamp() + %(ttl)s * interval '1 second'
WHERE session_id = %(sid)s
  AND (owner IS NULL OR owner = %(owner)s OR expires_at <= clock_timestamp())
RETURNING epoch
"""

_RENEW = """
UPDATE session_logs SET expires_at = clock_timestamp() + %(ttl)s * interval '1 second'
WHERE session_id = %(sid)s AND owner = %(owner)s AND epoch = %(epoch)s
"""

_RELEASE = """
UPDATE session_logs SET owner = NULL, expires_at = '-infinity'
WHERE session_id = %(sid)s AND owner = %(owner)s AND epoch = %(epoch)s
"""

_LEASE_STATE = """
SELECT head, owner = %(owner)s AND epoch = %(epoch)s AND expires_at > clock_timestamp()
FROM session_logs WHERE session_id = %(sid)s
"""

_LEASE_VALID = """
SELECT 1 FROM session_logs
WHERE session_id = %(sid)s AND owner = %(owner)s AND epoch = %(epoch)s
  AND expires_at > clock_timestamp()
"""


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unparsable database URL)"
    host, port, db = info.get("host", "localhost"), info.get("port", 5432), info.get("dbname")
    return f"postgresql://{host}:{port}/{db or ''}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore(Store):
    durable = True
    shared = True
    # Another replica replays a session's log when it takes the session over: a shorter
    # log (at most 4 state-sizes, for a quarter more writes) makes a takeover quicker.
    snapshot_policy = SnapshotPolicy(log_ratio=4.0)

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        wait_timeout: float = 2.0,
        owner: str | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> None:
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.wait_timeout = wait_timeout
        """How long a call waits for a pooled connection. The pool is larger than the
        service's threads, so a wait means the database cannot be reached: fail soon."""
        self.owner = owner or process_owner()
        """Who this store's own leases (taken by a write without one) belong to."""
        self.lease_ttl = lease_ttl
        self._pool: ConnectionPool[Conn] | None = None
        self._leases: dict[str, tuple[str, int]] = {}
        """Session id -> (owner, epoch) of the leases this store holds."""
        self._leases_lock = threading.Lock()
        self._own = Leases(self, ttl=lease_ttl, owner=self.owner)
        """The leases this store takes for writes made without one."""

    # -- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        pool: ConnectionPool[Conn] = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.wait_timeout,
            reconnect_timeout=self.connect_timeout,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(self.connect_timeout))},
            name="optserve",
        )
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except PoolTimeout as exc:
            pool.close()
            raise StoreUnavailable(
                f"cannot reach the database at {redact(self.url)}: {self._why_unreachable()}"
            ) from exc
        self._pool = pool
        with self._conn() as conn:
            schema.migrate(conn)

    def _why_unreachable(self) -> str:
        """The database's own word for why a connection fails (the pool only times out)."""
        try:
            psycopg.connect(self.url, connect_timeout=max(1, round(self.connect_timeout))).close()
        except psycopg.Error as exc:
            return first_line(exc)
        return "no connection within the timeout"

    def close(self) -> None:
        with self._leases_lock:
            held = list(self._leases.items())
            self._leases.clear()
        self._own = Leases(self, ttl=self.lease_ttl, owner=self.owner)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Released leases let another process take the sessions over at once.
            for session_id, (owner, epoch) in held:
                with pool.connection() as conn:
                    conn.execute(_RELEASE, {"sid": session_id, "owner": owner, "epoch": epoch})
        except _UNREACHABLE as exc:
            log.warning("could not release leases at close (%s); they will expire", exc)
        finally:
            pool.close()

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Conn]:
        """A pooled connection; losing the database becomes :class:`StoreUnavailable`."""
        pool = self._pool
        if pool is None:
            raise RuntimeError("the store is not open")
        try:
            with pool.connection() as conn:
                yield conn
        except _UNREACHABLE as exc:
            # The other pooled connections are probably broken too: have them replaced
            # in the background rather than each failing one request.
            with contextlib.suppress(Exception):
                pool.check()
            raise StoreUnavailable(
                f"the database at {redact(self.url)} is unreachable: {first_line(exc)}"
            ) from exc

    def ping(self) -> bool:
        try:
            with self._conn() as conn:
                conn.execute("SELECT 1").fetchone()
        except (StoreUnavailable, RuntimeError):
            return False
        return True

    # -- leases ------------------------------------------------------------------------

    def acquire(self, session_id: str, owner: str, ttl: float) -> int | None:
        with self._conn() as conn:
            row = conn.execute(_ACQUIRE, {"sid": session_id, "owner": owner, "ttl": ttl}).fetchone()
            if row is None:
                self._must_exist(conn, session_id)
        if row is None:
            return None
        epoch = int(row[0])
        with self._leases_lock:
            self._leases[session_id] = (owner, epoch)
        return epoch

    def renew(self, session_id: str, owner: str, epoch: int, ttl: float) -> bool:
        params = {"sid": session_id, "owner": owner, "epoch": epoch, "ttl": ttl}
        with self._conn() as conn:
            renewed = conn.execute(_RENEW, params).rowcount == 1
        if not renewed:
            self._forget_lease(session_id, owner, epoch)
        return renewed

    def release(self, session_id: str, owner: str, epoch: int) -> None:
        self._forget_lease(session_id, owner, epoch)
        with self._conn() as conn:
            conn.execute(_RELEASE, {"sid": session_id, "owner": owner, "epoch": epoch})

    def want(self, session_id: str, owner: str) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE session_logs SET wanted_by = %s "
                "WHERE session_id = %s AND owner IS DISTINCT FROM %s",
                (owner, session_id, owner),
            )

    def wanted(self, owner: str) -> list[str]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT session_id FROM session_logs "
                "WHERE owner = %s AND wanted_by IS NOT NULL AND expires_at > clock_timestamp()",
                (owner,),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def _forget_lease(self, session_id: str, owner: str, epoch: int) -> None:
        with self._leases_lock:
            if self._leases.get(session_id) == (owner, epoch):
                del self._leases[session_id]
        if self._own.epoch(session_id) == epoch:
            self._own.forget(session_id)

    def _lease(self, session_id: str) -> tuple[str, int]:
        """The lease a write of ``session_id`` is fenced by.

        One acquired through :meth:`acquire` is its holder's to renew. Without one, the
        store takes (and then renews, on use) a lease of its own.
        """
        with self._leases_lock:
            held = self._leases.get(session_id)
        if held is not None and self._own.epoch(session_id) != held[1]:
            return held
        self._own.ttl = self.lease_ttl
        self._own.hold(session_id)
        with self._leases_lock:
            held = self._leases.get(session_id)
        if held is None:  # released meanwhile by another thread
            raise Fenced(session_id, "its lease was released")
        return held

    @staticmethod
    def _must_exist(conn: Conn, session_id: str) -> None:
        found = conn.execute(
            "SELECT 1 FROM session_logs WHERE session_id = %s", (session_id,)
        ).fetchone()
        if found is None:
            raise KeyError(f"no stored session {session_id!r}")

    def _refusal(
        self, conn: Conn, session_id: str, owner: str, epoch: int, head_wanted: int, what: str
    ) -> Exception:
        """Why a fenced write found no row: unknown session, lost lease, or wrong head."""
        params = {"sid": session_id, "owner": owner, "epoch": epoch}
        row = conn.execute(_LEASE_STATE, params).fetchone()
        if row is None:
            return KeyError(f"no stored session {session_id!r}")
        head, lease_ok = int(row[0]), bool(row[1])
        if not lease_ok:
            self._forget_lease(session_id, owner, epoch)
            return Fenced(session_id, f"the lease of epoch {epoch} is no longer current")
        return ValueError(what.format(head=head, wanted=head_wanted))

    # -- sessions ----------------------------------------------------------------------

    def create(self, record: SessionRecord, snapshot: Snapshot) -> None:
        data = rows.snapshot_bytes(snapshot)
        try:
            with self._conn() as conn, conn.transaction():
                conn.execute(
                    "INSERT INTO tenants (id, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (record.tenant, record.created_at),
                )
                conn.execute(
                    "INSERT INTO sessions (id, tenant, config, labels, created_at) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    record.catalog_row(),
                )
                conn.execute(
                    "INSERT INTO session_logs (session_id, head, base) VALUES (%s, %s, %s)",
                    (record.id, snapshot.seq, snapshot.seq),
                )
                self._insert_snapshot(conn, record.id, snapshot.seq, data)
        except psycopg.errors.UniqueViolation:
            raise KeyError(f"session {record.id!r} already stored") from None

    @staticmethod
    def _insert_snapshot(conn: Conn, session_id: str, seq: int, data: bytes) -> None:
        pieces = list(rows.chunks(data))
        conn.execute(
            "INSERT INTO session_snapshots (session_id, seq, size, chunks) VALUES (%s, %s, %s, %s)",
            (session_id, seq, len(data), len(pieces)),
        )
        with conn.cursor() as cur:
            for index, piece, crc in pieces:
                cur.execute(
                    "INSERT INTO session_snapshot_chunks (session_id, seq, chunk, data, checksum) "
                    "VALUES (%s, %s, %s, %b, %s)",
                    (session_id, seq, index, piece, crc),
                )

    def delete(self, session_id: str) -> None:
        with self._leases_lock:
            self._leases.pop(session_id, None)
        self._own.forget(session_id)
        with self._conn() as conn:
            conn.execute("DELETE FROM sessions WHERE id = %s", (session_id,))

    def records(self) -> list[SessionRecord]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT id, tenant, config, labels, created_at FROM sessions "
                "ORDER BY created_at, id"
            ).fetchall()
        return [SessionRecord.from_catalog_row(row) for row in rows]

    def session_ids_of(self, tenant: str, after: str | None, limit: int) -> list[str]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT id FROM sessions WHERE tenant = %s AND id > %s ORDER BY id LIMIT %s",
                (tenant, after or "", limit),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def load(self) -> Iterator[StoredSession]:
        with self._conn() as conn:
            ids = [
                str(r[0])
                for r in conn.execute("SELECT id FROM sessions ORDER BY created_at, id").fetchall()
            ]
        for session_id in ids:
            try:
                loaded = self.load_session(session_id)
            except DamagedSession as exc:
                # One damaged session must not keep every other one from loading.
                log.error("%s; skipping it", exc)
                continue
            if loaded is not None:
                yield loaded

    def load_session(self, session_id: str) -> StoredSession | None:
        with self._conn() as conn, conn.transaction():
            # One snapshot of the database for every read: appends and compactions of
            # other processes must not fall between reading the head and the events.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute(
                "SELECT s.id, s.tenant, s.config, s.labels, s.created_at, l.head "
                "FROM sessions s JOIN session_logs l ON l.session_id = s.id WHERE s.id = %s",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            record = SessionRecord.from_catalog_row(row)
            head = int(row[5])
            manifests = conn.execute(
                "SELECT seq, size, chunks FROM session_snapshots "
                "WHERE session_id = %s ORDER BY seq",
                (session_id,),
            ).fetchall()
            if not manifests:
                raise DamagedSession(session_id, "it has no stored snapshot")
            base_seq, size, count = (int(v) for v in manifests[0])
            base = self._read_snapshot(conn, session_id, base_seq, size, count)
            events = self._read_events(conn, session_id, base_seq)
        expected = list(range(base_seq + 1, head + 1))
        if [e.seq for e in events] != expected:
            raise DamagedSession(
                session_id,
                f"its events after snapshot {base_seq} are not exactly {base_seq + 1}..{head}",
            )
        later = [int(m[0]) for m in manifests[1:]]
        return StoredSession(record, base, events, later)

    @staticmethod
    def _read_snapshot(conn: Conn, session_id: str, seq: int, size: int, count: int) -> Snapshot:
        data = np.empty(size, dtype=np.uint8)
        filled = 0
        with conn.cursor(binary=True) as cur:
            for index in range(count):
                # One chunk per query: memory stays at the snapshot plus one chunk.
                found = cur.execute(
                    "SELECT data, checksum FROM session_snapshot_chunks "
                    "WHERE session_id = %s AND seq = %s AND chunk = %s",
                    (session_id, seq, index),
                ).fetchone()
                if found is None:
                    raise DamagedSession(session_id, f"snapshot {seq} lacks chunk {index}")
                piece, crc = bytes(found[0]), int(found[1])
                if rows.checksum(piece) != crc:
                    raise DamagedSession(
                        session_id, f"snapshot {seq} chunk {index} fails its checksum"
                    )
                if filled + len(piece) > size:
                    raise DamagedSession(session_id, f"snapshot {seq} is longer than recorded")
                data[filled : filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                filled += len(piece)
        if filled != size:
            raise DamagedSession(session_id, f"snapshot {seq} is shorter than recorded")
        return rows.decode_snapshot(session_id, seq, data)

    @staticmethod
    def _read_events(conn: Conn, session_id: str, after: int) -> list[Event]:
        with conn.cursor(binary=True) as cur:
            found = cur.execute(
                "SELECT seq, frame, checksum FROM session_events "
                "WHERE session_id = %s AND seq > %s ORDER BY seq",
                (session_id, after),
            ).fetchall()
        return [
            rows.decode_event(session_id, int(seq), bytes(frame), int(crc))
            for seq, frame, crc in found
        ]

    # -- history -----------------------------------------------------------------------

    def append(self, session_id: str, event: Event) -> int:
        owner, epoch = self._lease(session_id)
        frame = rows.event_frame(event)
        params: dict[str, Any] = {
            "sid": session_id,
            "seq": event.seq,
            "owner": owner,
            "epoch": epoch,
            "kind": event.kind,
            "key": event.key,
            "frame": frame,
            "checksum": rows.checksum(frame),
        }
        with self._conn() as conn:
            try:
                inserted = conn.execute(_APPEND, params).rowcount
            except psycopg.errors.UniqueViolation:
                raise ValueError(
                    f"session {session_id}: idempotency key {event.key!r} is already logged"
                ) from None
            if inserted != 1:
                raise self._refusal(
                    conn,
                    session_id,
                    owner,
                    epoch,
                    event.seq - 1,
                    f"event {event.seq} does not follow event {{head}}",
                )
        return len(frame)

    def _check_lease(self, conn: Conn, session_id: str) -> None:
        """For snapshots and compaction: refuse them if a lease held here was lost."""
        with self._leases_lock:
            held = self._leases.get(session_id)
        if held is None:
            return
        owner, epoch = held
        valid = conn.execute(_LEASE_VALID, {"sid": session_id, "owner": owner, "epoch": epoch})
        if valid.fetchone() is None:
            self._forget_lease(session_id, owner, epoch)
            raise Fenced(session_id, f"the lease of epoch {epoch} is no longer current")

    def snapshot(self, session_id: str, snapshot: Snapshot) -> Callable[[], None]:
        data = rows.snapshot_bytes(snapshot)  # captured now: the arrays may be live state

        def write() -> None:
            with self._conn() as conn, conn.transaction():
                self._check_lease(conn, session_id)
                self._must_exist(conn, session_id)
                conn.execute(
                    "DELETE FROM session_snapshots WHERE session_id = %s AND seq = %s",
                    (session_id, snapshot.seq),
                )
                self._insert_snapshot(conn, session_id, snapshot.seq, data)

        return write

    def compact(self, session_id: str, base_seq: int, keys: Sequence[KeyRecord]) -> None:
        with self._conn() as conn, conn.transaction():
            self._check_lease(conn, session_id)
            found = conn.execute(
                "SELECT 1 FROM session_snapshots WHERE session_id = %s AND seq = %s",
                (session_id, base_seq),
            ).fetchone()
            if found is None:
                raise ValueError(f"no snapshot at event {base_seq}")
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO session_keys (session_id, key, fingerprint, step, seq) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (session_id, key) DO UPDATE "
                    "SET fingerprint = excluded.fingerprint, step = excluded.step, "
                    "seq = excluded.seq",
                    [(session_id, k.key, k.fingerprint, k.step, k.seq) for k in keys],
                )
            conn.execute(
                "DELETE FROM session_snapshots WHERE session_id = %s AND seq < %s",
                (session_id, base_seq),
            )
            conn.execute(
                "DELETE FROM session_events WHERE session_id = %s AND seq <= %s",
                (session_id, base_seq),
            )
            conn.execute(
                "UPDATE session_logs SET base = %s WHERE session_id = %s", (base_seq, session_id)
            )

    def find_key(self, session_id: str, key: str) -> KeyRecord | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT fingerprint, step, seq FROM session_keys "
                "WHERE session_id = %s AND key = %s",
                (session_id, key),
            ).fetchone()
        return None if row is None else KeyRecord(key, str(row[0]), int(row[1]), int(row[2]))


def check_reachable(url: str, timeout: float = 5.0) -> str | None:
    """Why the database at ``url`` cannot be used right now (one line), or None."""
    try:
        psycopg.connect(url, connect_timeout=max(1, round(timeout))).close()
    except psycopg.Error as exc:
        return f"cannot reach the database at {redact(url)}: {first_line(exc)}"
    return None

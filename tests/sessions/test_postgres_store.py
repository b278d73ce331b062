"""The PostgreSQL store beyond the common contract: leases, fencing, checksums, schema.

Everything runs against a real PostgreSQL (tests/postgres_cluster.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest

from service.sessions.store.base import DamagedSession, Event, Fenced, LeaseHeld
from service.sessions.store.postgres import PostgresStore, rows, schema
from tests.postgres_cluster import free_port
from tests.sessions.test_store_contract import assert_same_snapshot, event, record, snapshot

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stores(postgres_url: str) -> Iterator[list[PostgresStore]]:
    """Two replicas' stores on one database (owners "a" and "b"), with s1 created."""
    made = [PostgresStore(postgres_url, owner=name, pool_size=4) for name in ("a", "b")]
    for store in made:
        store.open()
    made[0].create(record(), snapshot(0, 1.0))
    yield made
    for store in made:
        store.close()


def rows_of(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql.encode()).fetchall()


def test_a_live_lease_keeps_others_out_until_released(stores: list[PostgresStore]) -> None:
    a, b = stores
    epoch = a.acquire("s1", "a", 30)
    assert epoch is not None
    assert b.acquire("s1", "b", 30) is None
    assert a.renew("s1", "a", epoch, 30)
    assert not b.renew("s1", "b", epoch, 30)
    a.release("s1", "a", epoch)
    taken = b.acquire("s1", "b", 30)
    assert taken == epoch + 1
    assert not a.renew("s1", "a", epoch, 30)
    with pytest.raises(KeyError):
        a.acquire("ghost", "a", 30)


def test_an_expired_lease_is_taken_over_and_fences_its_old_holder(
    stores: list[PostgresStore],
) -> None:
    a, b = stores
    old = a.acquire("s1", "a", 0.2)
    assert old is not None
    a.append("s1", event(1))
    time.sleep(0.4)
    new = b.acquire("s1", "b", 30)
    assert new == old + 1
    with pytest.raises(Fenced, match="no longer current"):
        a.append("s1", event(2))
    b.append("s1", event(2, key="b2"))
    # a's write without a lease now tries to take one, and b's is live.
    with pytest.raises(LeaseHeld):
        a.append("s1", event(3))
    loaded = b.load_session("s1")
    assert loaded is not None
    assert [(e.seq, e.key) for e in loaded.events] == [(1, None), (2, "b2")]


def test_an_expired_lease_fences_even_when_nobody_took_it(stores: list[PostgresStore]) -> None:
    a, _ = stores
    epoch = a.acquire("s1", "a", 0.2)
    assert epoch is not None
    time.sleep(0.4)
    with pytest.raises(Fenced):
        a.append("s1", event(1))
    # Nobody wrote meanwhile, so renewing the unchanged epoch is safe and allowed.
    assert a.acquire("s1", "a", 30) == epoch + 1
    a.append("s1", event(1))


def test_a_lease_the_store_took_itself_is_renewed_on_use(stores: list[PostgresStore]) -> None:
    a, b = stores
    a.lease_ttl = 0.3
    for seq in range(1, 11):  # one second of appends, over three lease periods
        a.append("s1", event(seq))
        time.sleep(0.1)
    assert b.acquire("s1", "b", 30) is None


def test_a_store_opened_again_takes_its_leases_again(stores: list[PostgresStore]) -> None:
    a, b = stores
    a.append("s1", event(1))
    a.close()  # releases the lease a took for that write
    epoch = b.acquire("s1", "b", 30)
    assert epoch is not None
    b.release("s1", "b", epoch)
    a.open()
    a.append("s1", event(2))
    assert b.acquire("s1", "b", 30) is None


def test_racing_writers_commit_exactly_one_event_per_seq(stores: list[PostgresStore]) -> None:
    """Two replicas take the session from each other (short leases, never renewed), each
    appending as fast as it can while it holds it: every seq is committed once, and what
    was acknowledged is exactly what is stored."""
    acked: list[tuple[int, str]] = []
    acked_lock = threading.Lock()
    deadline = time.monotonic() + 3.0

    def head_of(store: PostgresStore) -> int:
        loaded = store.load_session("s1")
        assert loaded is not None
        return loaded.snapshot.seq + len(loaded.events)

    def replica(store: PostgresStore) -> None:
        n = 0
        while time.monotonic() < deadline:
            if store.acquire("s1", store.owner, 0.15) is None:
                time.sleep(0.02)  # the other replica's lease is live: wait for its expiry
                continue
            head = head_of(store)
            while True:
                n += 1
                fingerprint = f"{store.owner}-{n}"
                e = Event(seq=head + 1, kind="step", at=0.0, fingerprint=fingerprint)
                try:
                    store.append("s1", e)
                except Fenced:
                    time.sleep(0.3)  # our lease ran out: stand back, so the other takes over
                    break
                except ValueError:  # the other wrote after we read the head: read it again
                    head = head_of(store)
                    continue
                with acked_lock:
                    acked.append((e.seq, fingerprint))
                head += 1

    threads = [threading.Thread(target=replica, args=(store,)) for store in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = stores[0].load_session("s1")
    assert loaded is not None
    stored = [(e.seq, e.fingerprint) for e in loaded.events]
    assert [seq for seq, _ in stored] == list(range(1, len(stored) + 1))
    assert sorted(acked) == stored
    owners = {fp.split("-")[0] for _, fp in stored}
    assert owners == {"a", "b"}, "both replicas should have written at some point"


def test_threads_sharing_a_lease_commit_each_seq_once(stores: list[PostgresStore]) -> None:
    a, _ = stores
    assert a.acquire("s1", "a", 60) is not None
    won: list[int] = []
    barrier = threading.Barrier(4, timeout=30)

    def writer(thread: int) -> None:
        for seq in range(1, 21):
            barrier.wait()
            try:
                a.append("s1", Event(seq=seq, kind="step", at=0.0, fingerprint=str(thread)))
            except ValueError:
                continue
            won.append(seq)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == list(range(1, 21))
    loaded = a.load_session("s1")
    assert loaded is not None
    assert [e.seq for e in loaded.events] == list(range(1, 21))


def test_a_frozen_replica_is_fenced_after_a_takeover(postgres_url: str) -> None:
    """SIGSTOP a replica past its lease, let another take the session over and write,
    SIGCONT it: it acknowledges nothing more, and everything it acknowledged is stored."""
    ttl = 1.0
    setup = PostgresStore(postgres_url, owner="setup")
    setup.open()
    setup.create(record(), snapshot(0, 1.0))
    setup.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.sessions.fenced_writer", postgres_url, "s1", "frozen",
         str(ttl)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")))  # type: ignore[union-attr]
    reader.start()
    taker = PostgresStore(postgres_url, owner="taker")
    taker.open()
    try:
        while sum(line.startswith("acked") for line in lines) < 20:
            assert child.poll() is None, lines
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(ttl + 0.5)
        epoch = None
        while epoch is None:  # the frozen owner's lease runs out
            epoch = taker.acquire("s1", "taker", 30)
            time.sleep(0.05)
        loaded = taker.load_session("s1")
        assert loaded is not None
        head = len(loaded.events)
        for seq in range(head + 1, head + 4):
            taker.append("s1", Event(seq=seq, kind="step", at=0.0, fingerprint="taker"))
        os.kill(child.pid, signal.SIGCONT)
        assert child.wait(timeout=30) == 0
        reader.join(timeout=10)
    finally:
        if child.poll() is None:
            os.kill(child.pid, signal.SIGCONT)
            child.kill()
            child.wait()
        taker.close()
        assert child.stdout is not None
        child.stdout.close()
    acked = [int(x.split()[1]) for x in lines if x.startswith("acked")]
    assert lines[-1].startswith("fenced"), lines[-3:]
    # An append that committed before the freeze may be acknowledged after it (it is
    # durable), but nothing written after the takeover.
    assert max(acked) <= head, "nothing may be acknowledged past the takeover"
    final = PostgresStore(postgres_url, owner="check")
    final.open()
    stored = final.load_session("s1")
    final.close()
    assert stored is not None
    events = [(e.seq, e.fingerprint) for e in stored.events]
    assert [seq for seq, _ in events] == list(range(1, len(events) + 1))
    assert set(acked) <= {seq for seq, fp in events if fp == "frozen"}
    assert [fp for _, fp in events[-3:]] == ["taker"] * 3


def test_a_snapshot_spanning_chunks_comes_back(
    stores: list[PostgresStore], monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    a, _ = stores
    monkeypatch.setattr(rows, "CHUNK_BYTES", 100)
    a.append("s1", event(1))
    big = snapshot(1, 7.0)
    a.snapshot("s1", big)()
    [(chunks,)] = rows_of(postgres_url, "SELECT chunks FROM session_snapshots WHERE seq = 1")
    assert isinstance(chunks, int) and chunks > 1
    a.compact("s1", 1, [])
    loaded = a.load_session("s1")
    assert loaded is not None
    assert_same_snapshot(loaded.snapshot, big)


def _corrupt(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.encode())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            "UPDATE session_events SET frame = overlay(frame PLACING '\\x00'::bytea FROM 90) "
            "WHERE seq = 2",
            "event 2 fails its checksum",
        ),
        (
            "UPDATE session_snapshot_chunks SET data = overlay(data PLACING '\\xff'::bytea "
            "FROM 40), checksum = checksum",
            "snapshot 0 chunk 0 fails its checksum",
        ),
        ("DELETE FROM session_events WHERE seq = 2", "are not exactly 1..3"),
        ("DELETE FROM session_snapshots", "no stored snapshot"),
    ],
)
def test_a_damaged_history_is_reported_never_replayed(
    stores: list[PostgresStore], postgres_url: str, damage: str, reason: str
) -> None:
    a, _ = stores
    a.create(record("s2", created_at=2.0), snapshot(0, 2.0))
    for i in range(1, 4):
        a.append("s1", event(i))
    _corrupt(postgres_url, damage.replace("WHERE", "WHERE session_id = 's1' AND", 1)
             if "WHERE" in damage else damage + " WHERE session_id = 's1'")  # fmt: skip
    with pytest.raises(DamagedSession, match=reason) as caught:
        a.load_session("s1")
    assert caught.value.session_id == "s1"
    # The others still load; the damaged one is left as it is.
    assert [s.record.id for s in a.load()] == ["s2"]
    assert rows_of(postgres_url, "SELECT id FROM sessions ORDER BY id") == [("s1",), ("s2",)]


def test_the_schema_version_is_recorded_and_a_newer_one_refused(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    store.open()
    store.close()
    store.open()  # migrating again is a no-op
    store.close()
    assert rows_of(postgres_url, "SELECT version FROM optserve_schema") == [
        (schema.SCHEMA_VERSION,)
    ]
    _corrupt(
        postgres_url, f"INSERT INTO optserve_schema (version) VALUES ({schema.SCHEMA_VERSION + 1})"
    )
    with pytest.raises(RuntimeError, match="upgrade optserve"):
        PostgresStore(postgres_url).open()


def test_an_idempotency_key_is_logged_once_per_session(stores: list[PostgresStore]) -> None:
    a, _ = stores
    a.append("s1", event(1, key="k"))
    with pytest.raises(ValueError, match="already logged"):
        a.append("s1", event(2, key="k"))
    a.append("s1", event(2, key="k2"))


def test_event_rows_hold_the_disk_logs_frames(
    stores: list[PostgresStore], postgres_url: str
) -> None:
    from service.sessions.store import logfile

    a, _ = stores
    sent = event(1, key="k", params=True)
    a.append("s1", sent)
    [(frame,)] = rows_of(postgres_url, "SELECT frame FROM session_events")
    assert isinstance(frame, bytes)
    assert frame == b"".join(logfile.encode(sent))
    assert np.frombuffer(frame[:4], dtype=np.uint8).tobytes() == logfile.MAGIC


def test_an_unreachable_database_is_a_clear_error() -> None:
    from service.sessions.store.base import StoreUnavailable

    store = PostgresStore(f"postgresql://nobody@127.0.0.1:{free_port()}/x", connect_timeout=1)
    with pytest.raises(StoreUnavailable, match="cannot reach the database"):
        store.open()
    assert not store.ping()

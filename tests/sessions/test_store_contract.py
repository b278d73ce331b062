"""The store contract: every backend (memory, disk) passes the same tests."""

from __future__ import annotations

import numpy as np
import pytest

from service.sessions.store import Event, KeyRecord, SessionRecord, Snapshot, Store
from tests.sessions.conftest import StoreFactory


def record(session_id: str = "s1", tenant: str = "t", created_at: float = 1.0) -> SessionRecord:
    return SessionRecord(
        session_id, tenant, {"optimizer": {"name": "SGD"}}, {"run": "7"}, created_at
    )


def snapshot(seq: int, value: float) -> Snapshot:
    arrays = {
        "state/a": np.full((2, 3), value, dtype=np.float32),
        "params/w": np.arange(4, dtype=np.float64) * value,
    }
    return Snapshot(seq, arrays, {"step": str(seq), "note": "x"}, 100.0 + seq)


def event(seq: int, key: str | None = None, *, params: bool = False) -> Event:
    rng = np.random.default_rng(seq)
    return Event(
        seq=seq,
        kind="step",
        at=200.0 + seq,
        key=key,
        fingerprint=f"fp{seq}",
        want="params" if params else "delta",
        grads={
            "w": rng.standard_normal((3, 2)).astype(np.float32),
            "empty": np.ones(0, dtype=np.float64),
        },
        params={"w": rng.standard_normal((3, 2)).astype(np.float32)} if params else None,
        loss=0.5 * seq if seq % 2 else None,
    )


def open_store(factory: StoreFactory) -> Store:
    store = factory()
    store.open()
    return store


def reopen(store: Store, factory: StoreFactory) -> Store:
    store.close()
    return open_store(factory)


def assert_same_event(a: Event, b: Event) -> None:
    assert (a.seq, a.kind, a.at, a.key, a.fingerprint, a.want, a.loss, a.metric) == (
        b.seq,
        b.kind,
        b.at,
        b.key,
        b.fingerprint,
        b.want,
        b.loss,
        b.metric,
    )
    assert a.grads.keys() == b.grads.keys()
    for name in a.grads:
        assert a.grads[name].dtype == b.grads[name].dtype
        assert a.grads[name].shape == b.grads[name].shape
        assert a.grads[name].tobytes() == b.grads[name].tobytes()
    assert (a.params is None) == (b.params is None)
    for name in a.params or {}:
        assert b.params is not None
        assert a.params[name].tobytes() == b.params[name].tobytes()


def assert_same_snapshot(a: Snapshot, b: Snapshot) -> None:
    assert (a.seq, a.at, a.metadata) == (b.seq, b.at, b.metadata)
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].dtype == b.arrays[name].dtype
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes()


def test_a_new_store_is_empty_and_reachable(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    assert store.ping()
    assert list(store.load()) == []
    assert store.load_session("nope") is None
    store.close()


def test_created_session_comes_back_after_reopen(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.5))
    store = reopen(store, store_factory)
    [loaded] = list(store.load())
    assert loaded.record == record()
    assert_same_snapshot(loaded.snapshot, snapshot(0, 1.5))
    assert loaded.events == []
    assert loaded.later_snapshots == []
    store.close()


def test_creating_an_existing_id_is_refused(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    with pytest.raises(KeyError):
        store.create(record(), snapshot(0, 2.0))
    store.close()


def test_snapshot_arrays_are_captured_not_referenced(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    snap = snapshot(0, 1.0)
    store.create(record(), snap)
    snap.arrays["state/a"][...] = 99.0
    later = Snapshot(0, dict(snap.arrays), snap.metadata, snap.at)
    store.append("s1", event(1))
    write = store.snapshot("s1", Snapshot(1, later.arrays, {"m": "1"}, 5.0))
    later.arrays["state/a"][...] = -1.0
    write()
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert np.all(loaded.snapshot.arrays["state/a"] == 1.0)
    assert loaded.later_snapshots == [1]
    store.close()


def test_events_come_back_in_order_bit_for_bit(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    sent = [event(i, key=f"k{i}" if i % 2 else None, params=i == 3) for i in range(1, 6)]
    sizes = [store.append("s1", e) for e in sent]
    assert all(size >= e.grads["w"].nbytes for size, e in zip(sizes, sent, strict=True))
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert len(loaded.events) == len(sent)
    for got, want in zip(loaded.events, sent, strict=True):
        assert_same_event(got, want)
    store.close()


def test_schedule_events_keep_their_metric(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", Event(seq=1, kind="schedule", at=3.0, metric=0.25))
    store.append("s1", Event(seq=2, kind="schedule", at=4.0, metric=None))
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert [(e.kind, e.metric, e.grads) for e in loaded.events] == [
        ("schedule", 0.25, {}),
        ("schedule", None, {}),
    ]
    store.close()


def test_an_event_out_of_sequence_is_refused(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    with pytest.raises(ValueError, match="does not follow"):
        store.append("s1", event(2))
    store.append("s1", event(1))
    with pytest.raises(ValueError, match="does not follow"):
        store.append("s1", event(1))
    store.close()


def test_appending_to_an_unknown_session_fails(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    with pytest.raises(KeyError):
        store.append("ghost", event(1))
    store.close()


def test_load_starts_from_the_base_and_lists_later_snapshots(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    for i in range(1, 4):
        store.append("s1", event(i))
    store.snapshot("s1", snapshot(3, 3.0))()
    for i in range(4, 6):
        store.append("s1", event(i))
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    # Nothing was compacted: recovery still starts at the creation snapshot.
    assert loaded.snapshot.seq == 0
    assert [e.seq for e in loaded.events] == [1, 2, 3, 4, 5]
    assert loaded.later_snapshots == [3]
    store.close()


def test_an_unwritten_snapshot_is_not_known(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store.snapshot("s1", snapshot(1, 2.0))  # captured, never written
    store.append("s1", event(2))
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert loaded.snapshot.seq == 0
    assert [e.seq for e in loaded.events] == [1, 2]
    store.close()


def test_compact_drops_history_and_archives_keys(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    for i in range(1, 4):
        store.append("s1", event(i, key=f"k{i}"))
    store.snapshot("s1", snapshot(3, 3.0))()
    store.append("s1", event(4, key="k4"))
    archived = [KeyRecord(f"k{i}", f"fp{i}", 10 + i, i) for i in range(1, 4)]
    store.compact("s1", 3, archived)
    assert store.find_key("s1", "k2") == archived[1]
    assert store.find_key("s1", "k4") is None
    assert store.find_key("other", "k2") is None
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert_same_snapshot(loaded.snapshot, snapshot(3, 3.0))
    assert [e.seq for e in loaded.events] == [4]
    assert loaded.later_snapshots == []
    assert store.find_key("s1", "k1") == archived[0]
    store.close()


def test_compacting_to_an_unknown_snapshot_is_refused(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    with pytest.raises(ValueError, match="no snapshot"):
        store.compact("s1", 1, [])
    store.close()


def test_delete_forgets_history_and_keys(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record("s1"), snapshot(0, 1.0))
    store.create(record("s2", created_at=2.0), snapshot(0, 2.0))
    store.append("s1", event(1, key="k1"))
    store.snapshot("s1", snapshot(1, 1.0))()
    store.compact("s1", 1, [KeyRecord("k1", "fp1", 1, 1)])
    store.delete("s1")
    store.delete("never-existed")
    assert store.find_key("s1", "k1") is None
    store = reopen(store, store_factory)
    assert [s.record.id for s in store.load()] == ["s2"]
    assert store.load_session("s1") is None
    # The id is free again.
    store.create(record("s1", created_at=3.0), snapshot(0, 3.0))
    assert [s.record.id for s in store.load()] == ["s2", "s1"]
    store.close()


def test_sessions_load_in_creation_order(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    for i, sid in enumerate(["c", "a", "b"]):
        store.create(record(sid, tenant=f"t{i}", created_at=float(i)), snapshot(0, 1.0))
    store = reopen(store, store_factory)
    assert [(s.record.id, s.record.tenant) for s in store.load()] == [
        ("c", "t0"),
        ("a", "t1"),
        ("b", "t2"),
    ]
    store.close()


def test_appends_continue_after_reopen(store_factory: StoreFactory) -> None:
    store = open_store(store_factory)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store = reopen(store, store_factory)
    store.append("s1", event(2))
    store.snapshot("s1", snapshot(2, 2.0))()
    store.append("s1", event(3))
    store = reopen(store, store_factory)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert [e.seq for e in loaded.events] == [1, 2, 3]
    for got in loaded.events:
        assert_same_event(got, event(got.seq))
    store.close()

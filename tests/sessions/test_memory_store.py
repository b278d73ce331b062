"""The memory store without history (memory-mode servers), and the store factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.sessions.store import DiskStore, KeyRecord, MemoryStore, make_store, memory
from tests.sessions.test_store_contract import event, record, snapshot


def test_without_history_nothing_is_kept_but_archived_keys() -> None:
    store = MemoryStore(keep_history=False)
    store.open()
    original = snapshot(0, 1.0)
    store.create(record(), original)
    assert store.append("s1", event(1)) > 0
    with pytest.raises(ValueError, match="does not follow"):
        store.append("s1", event(3))
    store.snapshot("s1", snapshot(1, 2.0))()
    store.compact("s1", 1, [KeyRecord("k1", "fp", 1, 1)])
    assert store.find_key("s1", "k1") == KeyRecord("k1", "fp", 1, 1)
    assert list(store.load()) == []
    assert store.load_session("s1") is None
    store.close()


def test_make_store(tmp_path: Path) -> None:
    disk = make_store("disk", tmp_path)
    assert isinstance(disk, DiskStore) and disk.durable
    memory = make_store("memory", tmp_path)
    assert isinstance(memory, MemoryStore) and not memory.durable and not memory.keep_history
    with pytest.raises(ValueError, match="storage"):
        make_store("s3", tmp_path)
    assert not list(tmp_path.iterdir())  # making a store touches nothing


def test_snapshot_capture_copies_the_arrays() -> None:
    store = MemoryStore()
    store.open()
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    live = snapshot(1, 5.0)
    write = store.snapshot("s1", live)
    live.arrays["state/a"][...] = np.nan
    write()
    stored = store.load_session("s1")
    assert stored is not None and stored.later_snapshots == [1]
    store.compact("s1", 1, [])
    stored = store.load_session("s1")
    assert stored is not None and np.all(stored.snapshot.arrays["state/a"] == 5.0)


def test_archived_keys_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "MAX_ARCHIVED_KEYS", 3)
    store = MemoryStore(keep_history=False)
    store.open()
    store.create(record(), snapshot(0, 1.0))
    store.compact("s1", 0, [KeyRecord(f"k{i}", "fp", i, i) for i in range(1, 6)])
    assert [store.find_key("s1", f"k{i}") is not None for i in range(1, 6)] == [
        False,
        False,
        True,
        True,
        True,
    ]

"""What only the disk store has to get right: crashes mid-write, debris, damaged files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.sessions.store import DiskStore, disk, logfile
from service.sessions.store.disk import SESSIONS_DIR
from tests.sessions.test_store_contract import event, record, snapshot


def opened(root: Path) -> DiskStore:
    store = DiskStore(root)
    store.open()
    return store


def session_dir(root: Path, sid: str = "s1") -> Path:
    return root / SESSIONS_DIR / sid


def only_log(root: Path) -> Path:
    [path] = sorted(session_dir(root).glob("log-*.bin"))
    return path


def test_a_torn_last_record_is_dropped_and_the_log_goes_on(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    size_after_one = only_log(tmp_path).stat().st_size
    store.append("s1", event(2))
    store.close()
    frame = sum(len(bytes(b)) for b in logfile.encode(event(2)))
    # A crash in the middle of writing event 2 (it was never acknowledged).
    os.truncate(only_log(tmp_path), size_after_one + frame // 2)

    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert [e.seq for e in loaded.events] == [1]
    assert only_log(tmp_path).stat().st_size == size_after_one
    store.append("s1", event(2, key="again"))
    store.close()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert [(e.seq, e.key) for e in loaded.events] == [(1, None), (2, "again")]
    store.close()


def test_garbage_after_the_last_record_is_cut_off(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store.close()
    size = only_log(tmp_path).stat().st_size
    with open(only_log(tmp_path), "ab") as f:
        f.write(os.urandom(100))
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and [e.seq for e in loaded.events] == [1]
    assert only_log(tmp_path).stat().st_size == size
    store.close()


def test_a_session_directory_without_a_row_is_removed(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.close()
    # A crash after the directory was made but before the row was committed.
    orphan = session_dir(tmp_path, "orphan")
    orphan.mkdir()
    (orphan / "snap-00000000000000000000.safetensors").write_bytes(b"partial")
    (session_dir(tmp_path) / "snap-00000000000000000007.safetensors.tmp").write_bytes(b"half")
    store = opened(tmp_path)
    assert not orphan.exists()
    assert not list(session_dir(tmp_path).glob("*.tmp"))
    assert [s.record.id for s in store.load()] == ["s1"]
    store.close()


def test_a_row_without_its_state_is_forgotten(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record("s1"), snapshot(0, 1.0))
    store.create(record("s2", created_at=2.0), snapshot(0, 1.0))
    store.close()
    for path in session_dir(tmp_path, "s1").iterdir():
        path.unlink()
    store = opened(tmp_path)
    assert [s.record.id for s in store.load()] == ["s2"]
    store.close()


def test_an_interrupted_compaction_still_loads_a_whole_history(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store.append("s1", event(2))
    store.snapshot("s1", snapshot(2, 2.0))()
    store.append("s1", event(3))
    store.close()
    # The old segment is gone but its snapshot is not: it has nothing to replay from.
    (session_dir(tmp_path) / "log-00000000000000000000.bin").unlink()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert loaded.snapshot.seq == 2
    assert [e.seq for e in loaded.events] == [3]
    store.close()


def test_an_unreadable_snapshot_falls_back_to_the_next(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store.snapshot("s1", snapshot(1, 2.0))()
    store.append("s1", event(2))
    store.close()
    (session_dir(tmp_path) / "snap-00000000000000000000.safetensors").write_bytes(b"\x00" * 9)
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert loaded.snapshot.seq == 1
    assert np.all(loaded.snapshot.arrays["state/a"] == 2.0)
    assert [e.seq for e in loaded.events] == [2]
    store.close()


def test_a_failed_append_leaves_no_partial_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    size = only_log(tmp_path).stat().st_size

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(disk.os, "fdatasync", failing_sync)
    with pytest.raises(OSError):
        store.append("s1", event(2))
    monkeypatch.undo()
    assert only_log(tmp_path).stat().st_size == size
    store.append("s1", event(2))
    store.close()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and [e.seq for e in loaded.events] == [1, 2]
    store.close()


def test_ping_fails_once_closed(tmp_path: Path) -> None:
    store = opened(tmp_path)
    assert store.ping()
    store.close()
    assert not store.ping()


def test_a_data_directory_has_one_writer(tmp_path: Path) -> None:
    first = opened(tmp_path)
    with pytest.raises(disk.DataDirInUse):
        DiskStore(tmp_path).open()
    first.close()
    second = opened(tmp_path)  # the lock went with the first store
    second.close()

"""What only the disk store has to get right: crashes mid-write, debris, damaged files."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.sessions.store import DiskStore, KeyRecord, appender, disk, history, logfile
from service.sessions.store.base import Event, PreparedAppend
from service.sessions.store.disk import SESSIONS_DIR
from tests.sessions.test_logfile import received_event
from tests.sessions.test_store_contract import event, record, snapshot


def opened(root: Path) -> DiskStore:
    store = DiskStore(root)
    store.open()
    return store


def reopened_seqs(root: Path) -> list[int] | None:
    """The events of session s1 as a store opened afresh on ``root`` loads them."""
    store = opened(root)
    try:
        loaded = store.load_session("s1")
        return None if loaded is None else [e.seq for e in loaded.events]
    finally:
        store.close()


def session_dir(root: Path, sid: str = "s1") -> Path:
    return root / SESSIONS_DIR / sid


def only_log(root: Path) -> Path:
    [path] = sorted(session_dir(root).glob("log-*.bin"))
    return path


def test_a_torn_last_record_is_dropped_and_the_log_goes_on(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    # The log's frames start at 0; zeros written ahead follow them while it is open.
    size_after_one = store.append("s1", event(1))
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


def test_zeros_after_the_last_record_are_room_for_the_next(tmp_path: Path) -> None:
    # Zeros written ahead of the log's end (or an extension whose data never reached the
    # disk): the next record goes right after the last one, and closing gives them back.
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    size = store.append("s1", event(1))
    store.close()
    with open(only_log(tmp_path), "ab") as f:
        f.write(bytes(4 * 4096))
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and loaded.damage is None and [e.seq for e in loaded.events] == [1]
    size += store.append("s1", event(2))
    store.close()
    assert only_log(tmp_path).stat().st_size == size
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and [e.seq for e in loaded.events] == [1, 2]
    store.close()


def test_garbage_after_the_last_record_is_damage_and_is_kept(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.append("s1", event(1))
    store.close()
    with open(only_log(tmp_path), "ab") as f:
        f.write(os.urandom(100))
    before = only_log(tmp_path).read_bytes()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and loaded.damage is not None
    assert only_log(tmp_path).read_bytes() == before
    store.close()


def test_a_half_created_session_is_removed(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    store.close()
    # A crash while the directory was being built: it was never renamed into place.
    orphan = session_dir(tmp_path, disk.CREATING + "orphan")
    orphan.mkdir()
    (orphan / "snap-00000000000000000000.safetensors").write_bytes(b"partial")
    (session_dir(tmp_path) / "snap-00000000000000000007.safetensors.tmp").write_bytes(b"half")
    store = opened(tmp_path)
    assert not orphan.exists()
    assert not list(session_dir(tmp_path).glob("*.tmp"))
    assert [s.record.id for s in store.load()] == ["s1"]
    store.close()


def test_a_lost_catalog_is_rebuilt_from_the_session_directories(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record("s1"), snapshot(0, 1.0))
    store.create(record("s2", tenant="u", created_at=2.0), snapshot(0, 3.0))
    for seq in (1, 2):
        store.append("s2", event(seq, key=f"k{seq}"))
    store.snapshot("s2", snapshot(2, 4.0))()
    store.compact("s2", 2, [KeyRecord("k1", "fp1", 1, 1), KeyRecord("k2", "fp2", 2, 2)])
    store.close()
    (tmp_path / disk.DB_NAME).unlink()
    store = opened(tmp_path)
    loaded = {s.record.id: s for s in store.load()}
    assert loaded.keys() == {"s1", "s2"}
    assert loaded["s2"].record == record("s2", tenant="u", created_at=2.0)
    assert loaded["s2"].damage is None and loaded["s2"].snapshot is not None
    assert loaded["s2"].snapshot.seq == 2
    assert store.find_key("s2", "k1") == KeyRecord("k1", "fp1", 1, 1)
    store.close()


def test_a_directory_without_a_readable_record_is_kept_and_reported(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record("s1"), snapshot(0, 1.0))
    store.close()
    (tmp_path / disk.DB_NAME).unlink()
    (session_dir(tmp_path) / "record").write_bytes(b"garbage")
    store = opened(tmp_path)
    assert list(store.load()) == []
    assert session_dir(tmp_path).is_dir()
    assert "s1" in store.unlisted and store.session_ids() == ["s1"]
    store.close()


def test_a_row_without_its_state_is_damaged_not_forgotten(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record("s1"), snapshot(0, 1.0))
    store.create(record("s2", created_at=2.0), snapshot(0, 1.0))
    store.close()
    for path in session_dir(tmp_path, "s1").glob("snap-*"):
        path.write_bytes(b"")
    store = opened(tmp_path)
    loaded = list(store.load())
    assert [(s.record.id, s.damage is None) for s in loaded] == [("s1", False), ("s2", True)]
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
    size = store.append("s1", event(1))

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


def test_an_unfinished_line_of_archived_keys_is_cut_before_the_next(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.create(record(), snapshot(0, 1.0))
    for seq in (1, 2, 3, 4):
        store.append("s1", event(seq, key=f"k{seq}"))
        if seq % 2 == 0:
            store.snapshot("s1", snapshot(seq, float(seq)))()
            store.compact("s1", seq, [KeyRecord(f"k{s}", f"fp{s}", s, s) for s in (seq - 1, seq)])
        if seq == 2:
            with open(session_dir(tmp_path) / "keys", "ab") as f:
                f.write(b'0123456789abcdef {"keys": [[')  # a compaction cut short
    store.close()
    (tmp_path / disk.DB_NAME).unlink()
    store = opened(tmp_path)
    assert [store.find_key("s1", f"k{s}") for s in (1, 2, 3, 4)] == [
        KeyRecord(f"k{s}", f"fp{s}", s, s) for s in (1, 2, 3, 4)
    ]
    loaded = store.load_session("s1")
    assert loaded is not None and loaded.damage is None
    store.close()


def test_small_appends_write_zeros_ahead_and_closing_gives_them_back(tmp_path: Path) -> None:
    """A log of small frames holds written zeros past its last frame while it is open (so
    that the next appends change no metadata); closing cuts them off."""
    store = DiskStore(tmp_path)
    store.open()
    store.create(record(), snapshot(0, 1.0))
    log = tmp_path / SESSIONS_DIR / "s1" / history.log_name(0)
    first = store.append("s1", event(1))
    # The first append wrote the zeros after its frame, the second overwrote some of them.
    written = first + store.append("s1", event(2))
    assert log.stat().st_size == first + appender.ZEROS_AHEAD_MIN
    assert not logfile.read_file(log)[written:].any()
    store.close()
    assert log.stat().st_size == written
    assert reopened_seqs(tmp_path) == [1, 2]


def _large_appends(store: DiskStore, count: int) -> int:
    return sum(store.append("s1", _large(seq)) for seq in range(1, count + 1))


def test_large_appends_past_the_zeros_limit_reserve_blocks_and_closing_gives_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log of frames too large for zeros ahead keeps its size that of its frames; the
    blocks ahead of it are allocated while it appends and released when it closes."""
    monkeypatch.setattr(appender, "LARGE_ZEROS_MAX_FRAME", appender.ZEROS_AHEAD_MAX_FRAME)
    store = DiskStore(tmp_path)
    store.open()
    store.create(record(), snapshot(0, 1.0))
    log = tmp_path / SESSIONS_DIR / "s1" / history.log_name(0)
    written = _large_appends(store, 2)
    reserved = log.stat().st_blocks * 512
    assert log.stat().st_size == written
    if appender._fallocate is None:
        pytest.skip("no fallocate here: nothing is reserved")
    assert reserved >= written + appender.RESERVE_MIN
    store.close()
    assert log.stat().st_size == written
    assert log.stat().st_blocks * 512 < reserved
    assert reopened_seqs(tmp_path) == [1, 2]


def test_large_appends_overwrite_zeros_written_ahead_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each large frame, zeros for two more are written in the background: every
    append but the first lands in written blocks (on a filesystem that reserves none, it
    asks for none), the zeros read as the log's end, and closing gives them back."""
    reserving: list[int] = []

    def reserves_nothing(fd: int, end: int, frame: int) -> int:
        reserving.append(end)
        return end

    monkeypatch.setattr(appender, "reserve", reserves_nothing)
    store = DiskStore(tmp_path)
    store.open()
    store.create(record(), snapshot(0, 1.0))
    log = tmp_path / SESSIONS_DIR / "s1" / history.log_name(0)
    written = 0
    for seq in range(1, 5):
        written += store.append("s1", _large(seq))
        zeroing = store._logs["s1"].zeroing
        assert zeroing is not None
        zeroing.result()  # the time a step's reply and the next request take
    assert reserving == [0]  # the first frame's blocks only
    frame = written // 4
    assert log.stat().st_size == written + 2 * frame
    assert not logfile.read_file(log)[written:].any()
    store.close()
    assert log.stat().st_size == written
    assert reopened_seqs(tmp_path) == [1, 2, 3, 4]


def _large(seq: int) -> Event:
    grads = {"w": np.full(appender.ZEROS_AHEAD_MAX_FRAME // 4 + 1, float(seq), np.float32)}
    return dataclasses.replace(event(seq), grads=grads)


def _direct_store(root: Path) -> DiskStore:
    store = opened(root)
    store.create(record(), snapshot(0, 1.0))
    if not store._log("s1").direct:
        store.close()
        pytest.skip("this filesystem takes no O_DIRECT writes: large frames are not split")
    return store


def _second_written_ahead(root: Path) -> tuple[DiskStore, int, PreparedAppend]:
    """A log of one large frame, and the tensors of a second written ahead of its head."""
    store = _direct_store(root)
    size = store.append("s1", _large(1))
    prepared = store.prepare_append("s1", _large(2))
    assert prepared.ahead is not None
    prepared.ahead()
    return store, size, prepared


def test_a_large_frame_written_ahead_and_abandoned_leaves_the_log_as_it_was(
    tmp_path: Path,
) -> None:
    store, size, prepared = _second_written_ahead(tmp_path)
    assert only_log(tmp_path).stat().st_size > size  # the tensors are on disk
    prepared.abandon()
    assert only_log(tmp_path).stat().st_size == size
    store.append("s1", dataclasses.replace(_large(2), key="instead"))
    store.close()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None
    assert [(e.seq, e.key) for e in loaded.events] == [(1, None), (2, "instead")]
    assert np.all(loaded.events[1].grads["w"] == 2.0)
    store.close()


def test_a_crash_after_a_frames_tensors_but_before_its_head_is_a_torn_write(
    tmp_path: Path,
) -> None:
    store, size, _ = _second_written_ahead(tmp_path)
    os.close(store._log("s1").fd)  # the process dies here: nothing more is written
    store._logs.clear()
    store.close()
    data = np.fromfile(only_log(tmp_path), dtype=np.uint8)
    assert not data[size : size + logfile.BLOCK].any() and data[size + logfile.BLOCK :].any()
    scanned = logfile.scan(data, "s1")
    assert scanned.torn and scanned.damage is None
    assert [e.seq for e in scanned.events] == [1]

    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and [e.seq for e in loaded.events] == [1]
    assert only_log(tmp_path).stat().st_size == size
    store.append("s1", _large(2))
    store.close()
    store = opened(tmp_path)
    loaded = store.load_session("s1")
    assert loaded is not None and [e.seq for e in loaded.events] == [1, 2]
    store.close()


def test_zeros_queued_behind_other_logs_are_dropped_not_waited_for(tmp_path: Path) -> None:
    """One session's append never waits for zeros queued behind another log's: the store's
    zeros thread is held here, and the appends go on, reserving their blocks."""
    store = DiskStore(tmp_path)
    store.open()
    store.create(record(), snapshot(0, 1.0))
    held = threading.Event()
    store._pools.zeros.submit(held.wait, 30)  # the zeros thread is busy elsewhere
    try:
        start = time.monotonic()
        written = _large_appends(store, 3)
        assert time.monotonic() - start < 10
        log = store._logs["s1"]
        assert log.zeroing is not None and not log.zeroing.done()  # the last one, queued
        assert log.zeroed == 0  # none was written: each was dropped by the next append
    finally:
        held.set()
    store._logs["s1"].settle()
    store.close()
    assert reopened_seqs(tmp_path) == [1, 2, 3]
    assert (tmp_path / SESSIONS_DIR / "s1" / history.log_name(0)).stat().st_size == written


def test_large_steps_received_in_one_buffer_are_stored_as_received(tmp_path: Path) -> None:
    """A step's tensors as the server receives them (views of one body, its data on a page)
    are appended from that buffer as it holds them, and read back as they were sent."""
    store = _direct_store(tmp_path)
    sizes = (appender.ZEROS_AHEAD_MAX_FRAME // 4 + 3, 1003, 5)
    sent = [received_event(seq, sizes) for seq in (1, 2, 3)]
    assert all(logfile.mirrored([*e.grads.values(), *(e.params or {}).values()]) for e in sent)
    for step in sent:
        store.append("s1", dataclasses.replace(step, params=None) if step.seq == 2 else step)
    store.close()
    reopened = opened(tmp_path)
    loaded = reopened.load_session("s1")
    reopened.close()
    assert loaded is not None and loaded.damage is None
    assert [e.seq for e in loaded.events] == [1, 2, 3]
    for got, want in zip(loaded.events, sent, strict=True):
        assert list(got.grads) == list(want.grads)
        assert all(got.grads[n].tobytes() == a.tobytes() for n, a in want.grads.items())
        if want.seq != 2:
            assert got.params is not None and want.params is not None
            assert got.params["t0"].tobytes() == want.params["t0"].tobytes()

"""The event log's frame format: round trip, and torn or damaged tails are detected."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
from pathlib import Path

import numpy as np
import pytest

from service.api.wire import step_from_safetensors
from service.codec import safetensors
from service.sessions.store import appender, logfile
from service.sessions.store.appender import BLOCK, aligned
from service.sessions.store.base import Event


def sample(seq: int) -> Event:
    rng = np.random.default_rng(seq)
    return Event(
        seq=seq,
        kind="step",
        at=1.5 * seq,
        key=f"key-{seq}",
        fingerprint="ab" * 32,
        want="delta",
        grads={
            "w": rng.standard_normal((5, 3)).astype(np.float32),
            "scalar": np.array(2.5, dtype=np.float64),
            "odd": rng.standard_normal(3).astype(np.float32),
        },
        params={"w": rng.standard_normal((5, 3)).astype(np.float32)} if seq % 2 else None,
        loss=float("nan") if seq == 3 else 0.25,
    )


def frame_bytes(event: Event, session: str = "", block_aligned: bool = False) -> bytes:
    """One frame as the appender writes it: padded to the next block boundary."""
    raw = b"".join(bytes(b) for b in logfile.encode(event, session, block_aligned))
    return raw + bytes(aligned(len(raw)) - len(raw))


def unpadded_length(event: Event) -> int:
    return sum(len(bytes(b)) for b in logfile.encode(event))


def test_frames_round_trip_bit_for_bit() -> None:
    events = [sample(i) for i in range(1, 5)]
    data = np.frombuffer(b"".join(frame_bytes(e) for e in events), dtype=np.uint8)
    scan = logfile.scan(data)
    assert not scan.torn
    assert scan.valid_bytes == data.size
    for got, want in zip(scan.events, events, strict=True):
        assert (got.seq, got.key, got.at, got.want) == (want.seq, want.key, want.at, want.want)
        for name, array in want.grads.items():
            assert got.grads[name].shape == array.shape
            assert got.grads[name].tobytes() == array.tobytes()
        assert (got.params is None) == (want.params is None)
    assert np.isnan(scan.events[2].loss)  # type: ignore[arg-type]


def test_tensor_views_are_aligned() -> None:
    data = np.frombuffer(frame_bytes(sample(1)) + frame_bytes(sample(2)), dtype=np.uint8).copy()
    for event in logfile.scan(data).events:
        for array in event.grads.values():
            assert array.flags.aligned


def test_every_truncation_point_keeps_exactly_the_whole_frames() -> None:
    first, second = frame_bytes(sample(1)), frame_bytes(sample(2))
    assert len(first) % BLOCK == 0
    whole = first + second
    second_end = len(first) + unpadded_length(sample(2))
    for cut in range(len(first), len(whole) + 1):
        scan = logfile.scan(np.frombuffer(whole[:cut], dtype=np.uint8))
        if cut < second_end:
            assert [e.seq for e in scan.events] == [1]
            assert scan.valid_bytes == len(first)
            assert scan.torn == (cut != len(first))
        else:  # only padding is missing: the frame is whole
            assert [e.seq for e in scan.events] == [1, 2]
            assert scan.valid_bytes == len(whole)
            assert not scan.torn


def test_a_frame_cut_inside_its_own_bytes_is_dropped() -> None:
    raw = b"".join(bytes(b) for b in logfile.encode(sample(1)))
    for cut in range(0, len(raw), 7):
        scan = logfile.scan(np.frombuffer(raw[:cut], dtype=np.uint8))
        assert scan.events == []
        assert scan.valid_bytes == 0
        assert scan.torn == (cut > 0)


@pytest.mark.parametrize("where", ["header", "data", "last"])
def test_a_flipped_bit_in_a_whole_last_frame_is_damage_not_a_tear(where: str) -> None:
    first, second = frame_bytes(sample(1)), bytearray(frame_bytes(sample(2)))
    length = unpadded_length(sample(2))
    position = {"header": logfile.PREFIX_SIZE + 3, "data": length // 2, "last": length - 1}[where]
    second[position] ^= 0x10
    data = np.frombuffer(first + bytes(second), dtype=np.uint8)
    scan = logfile.scan(data)
    assert [e.seq for e in scan.events] == [1]
    assert not scan.torn and scan.damage is not None and "checksum" in scan.damage


def test_a_flipped_length_of_the_last_frame_reads_as_a_write_cut_short() -> None:
    # Its frame then ends past the file: that cannot be told from an interrupted append.
    first, second = frame_bytes(sample(1)), bytearray(frame_bytes(sample(2)))
    second[9] ^= 0x10  # data length
    scan = logfile.scan(np.frombuffer(first + bytes(second), dtype=np.uint8))
    assert [e.seq for e in scan.events] == [1] and scan.torn


def test_a_bad_frame_with_intact_frames_after_it_is_damage() -> None:
    frames = [bytearray(frame_bytes(sample(i))) for i in (1, 2, 3)]
    frames[1][logfile.PREFIX_SIZE + 3] ^= 0x01
    scan = logfile.scan(np.frombuffer(b"".join(frames), dtype=np.uint8))
    assert [e.seq for e in scan.events] == [1]
    assert not scan.torn and scan.damage is not None
    assert [e.seq for e in scan.beyond] == [3]


def test_a_last_frame_with_a_sector_never_written_is_torn() -> None:
    big = dataclasses.replace(sample(2), grads={"w": np.ones(1000, dtype=np.float32)})
    first, second = frame_bytes(sample(1)), bytearray(frame_bytes(big))
    second[:512] = bytes(512)
    scan = logfile.scan(np.frombuffer(first + bytes(second), dtype=np.uint8))
    assert [e.seq for e in scan.events] == [1] and scan.torn


def test_a_torn_frame_in_zeros_written_ahead_is_torn() -> None:
    big = dataclasses.replace(sample(2), grads={"w": np.ones(1000, dtype=np.float32)})
    first, second = frame_bytes(sample(1)), bytearray(frame_bytes(big))
    second[1024:1536] = bytes(512)
    data = np.frombuffer(first + bytes(second) + bytes(3 * BLOCK), dtype=np.uint8)
    scan = logfile.scan(data)
    assert [e.seq for e in scan.events] == [1] and scan.torn and scan.damage is None
    assert scan.valid_bytes == len(first)


def test_a_frame_of_another_session_is_damage() -> None:
    raw = b"".join(bytes(b) for b in logfile.encode(sample(1), "other"))
    scan = logfile.scan(np.frombuffer(raw, dtype=np.uint8), "mine")
    assert scan.events == [] and scan.damage is not None and "other" in scan.damage
    assert [e.seq for e in logfile.scan(np.frombuffer(raw, dtype=np.uint8), "other").events] == [1]


def test_zeros_after_the_last_frame_are_room_for_the_next() -> None:
    first = frame_bytes(sample(1))
    scan = logfile.scan(np.frombuffer(first + bytes(3 * BLOCK), dtype=np.uint8))
    assert [e.seq for e in scan.events] == [1]
    assert scan.clean and scan.valid_bytes == len(first)


def test_a_frame_after_zeros_is_damage() -> None:
    # Zeros are room only at the end: an intact frame after them means lost frames.
    data = frame_bytes(sample(1)) + bytes(BLOCK) + frame_bytes(sample(3))
    scan = logfile.scan(np.frombuffer(data, dtype=np.uint8))
    assert [e.seq for e in scan.events] == [1] and scan.damage is not None
    assert [e.seq for e in scan.beyond] == [3]


def test_write_all_writes_every_buffer(tmp_path: Path) -> None:
    buffers = logfile.encode(sample(1))
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT)
    try:
        written = logfile.write_all(fd, buffers)
    finally:
        os.close(fd)
    assert written == unpadded_length(sample(1))
    assert logfile.read_file(tmp_path / "log").tobytes() == frame_bytes(sample(1))[:written]


def log_opened(path: Path, direct: bool) -> tuple[int, bool]:
    """A new log, with ``O_DIRECT`` where asked and the filesystem takes it; whether it did."""
    if direct:
        return appender.open_log(path, create=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT), False


@pytest.mark.parametrize("direct", [True, False])
def test_appended_frames_read_back_at_block_boundaries(tmp_path: Path, direct: bool) -> None:
    path = tmp_path / "log"
    fd, direct = log_opened(path, direct)
    try:
        offset = 0
        for seq in (1, 2, 3):
            offset += appender.append(fd, direct, offset, logfile.encode(sample(seq)))
            assert offset % BLOCK == 0
    finally:
        os.close(fd)
    data = logfile.read_file(path)
    assert data.size == offset
    assert data.tobytes() == b"".join(frame_bytes(sample(seq)) for seq in (1, 2, 3))
    scan = logfile.scan(data)
    assert [e.seq for e in scan.events] == [1, 2, 3] and not scan.torn


def test_a_write_refused_with_o_direct_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log"
    fd, direct = appender.open_log(path, create=True)
    real = os.pwritev
    calls: list[int] = []

    def refuse_first(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(appender.os, "pwritev", refuse_first)
    try:
        appender.append(fd, True, 0, logfile.encode(sample(1)))
        appender.append(fd, direct, BLOCK, logfile.encode(sample(2)))
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
    finally:
        os.close(fd)
    monkeypatch.undo()
    scan = logfile.scan(logfile.read_file(path))
    assert [e.seq for e in scan.events] == [1, 2]


def _page_aligned(nbytes: int) -> np.ndarray:
    """A buffer of ``nbytes`` starting on a page, as a step's body is received."""
    raw = np.empty(nbytes + BLOCK, dtype=np.uint8)
    shift = -raw.ctypes.data % BLOCK
    return raw[shift : shift + nbytes]


def large_event(seq: int) -> Event:
    """Gradients in page-aligned memory: one of whole blocks, one with a tail, one not."""
    rng = np.random.default_rng(seq)
    whole = _page_aligned(4 * BLOCK).view(np.float32)
    whole[:] = rng.standard_normal(whole.size)
    tail = _page_aligned(3 * BLOCK + 20).view(np.float32)
    tail[:] = rng.standard_normal(tail.size)
    return dataclasses.replace(
        sample(seq),
        grads={"whole": whole, "tail": tail, "odd": rng.standard_normal(7).astype(np.float64)},
        params={"whole": whole.copy()},
    )


def test_a_block_aligned_frame_puts_every_tensor_of_a_block_on_one_and_reads_back() -> None:
    events = [large_event(1), large_event(2)]
    data = np.frombuffer(
        b"".join(frame_bytes(e, "s", block_aligned=True) for e in events), np.uint8
    )
    scan = logfile.scan(data, "s")
    assert scan.clean and [e.seq for e in scan.events] == [1, 2]
    for got, want in zip(scan.events, events, strict=True):
        for group in ("grads", "params"):
            for name, array in (getattr(want, group) or {}).items():
                read = getattr(got, group)[name]
                assert read.tobytes() == array.tobytes()
                unit = BLOCK if array.nbytes >= BLOCK else 8
                assert (read.ctypes.data - data.ctypes.data) % unit == 0


def test_small_tensors_of_a_block_aligned_frame_are_packed() -> None:
    event = dataclasses.replace(sample(1), params=None)
    compact = [len(bytes(b)) for b in logfile.encode(event)]
    padded = [len(bytes(b)) for b in logfile.encode(event, block_aligned=True)]
    assert sum(padded[:3]) == BLOCK  # prefix and header: one block, the data after it
    assert padded[3:] == compact[3:]  # the tensors packed as in any frame


@pytest.mark.parametrize("direct", [True, False])
def test_aligned_tensors_are_written_from_their_own_memory(tmp_path: Path, direct: bool) -> None:
    event = large_event(1)
    views, total = appender.frame_views(logfile.encode(event, block_aligned=True))
    segments = appender.Staging().segments(views, aligned(total))
    sources = {np.frombuffer(s, np.uint8).ctypes.data for s in segments}
    assert event.grads["whole"].ctypes.data in sources  # not copied
    assert event.grads["tail"].ctypes.data in sources  # its whole blocks, not copied
    for segment in segments:
        assert segment.nbytes % BLOCK == 0
        assert np.frombuffer(segment, np.uint8).ctypes.data % BLOCK == 0
    assert b"".join(bytes(s) for s in segments) == frame_bytes(event, block_aligned=True)
    path = tmp_path / "log"
    fd, direct = log_opened(path, direct)
    try:
        end = appender.append(fd, direct, 0, logfile.encode(event, block_aligned=True))
        end += appender.append(fd, direct, end, logfile.encode(sample(2)))
    finally:
        os.close(fd)
    data = logfile.read_file(path)
    assert data.size == end
    assert [e.seq for e in logfile.scan(data).events] == [1, 2]


def received_event(seq: int, sizes: tuple[int, ...] = (1003, 2500, 7, 4096)) -> Event:
    """A step's tensors as the server receives them: views of one safetensors body whose
    tensor data starts on a page (grads, and a param)."""
    rng = np.random.default_rng(seq)
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    tensors["params/t0"] = rng.standard_normal(sizes[0]).astype(np.float32)
    body = safetensors.encode(tensors)
    start = safetensors.data_start(body)
    assert start is not None
    raw = np.empty(len(body) + BLOCK, dtype=np.uint8)
    shift = -(raw.ctypes.data + start) % BLOCK
    buffer = raw[shift : shift + len(body)]
    buffer[:] = np.frombuffer(body, np.uint8)
    decoded = step_from_safetensors(buffer.data, 16)
    return dataclasses.replace(sample(seq), grads=decoded.grads, params=decoded.params)


@pytest.mark.parametrize("direct", [True, False])
def test_tensors_received_in_one_buffer_are_written_as_it_holds_them(
    tmp_path: Path, direct: bool
) -> None:
    event = received_event(1)
    arrays = [*event.grads.values(), *(event.params or {}).values()]
    parts = logfile.layout(event, "s", block_aligned=True)
    # The frame's data is the body's tensor data itself: one view of the receive buffer,
    # starting where the first tensor does (so none is copied into staging).
    (data, *padding) = parts.body
    assert np.frombuffer(data, np.uint8).ctypes.data == min(a.ctypes.data for a in arrays)
    assert isinstance(data, memoryview) and data.nbytes == sum(a.nbytes for a in arrays)
    assert all(not any(bytes(p)) for p in padding)
    views, total = appender.frame_views(logfile.encode(event, "s", block_aligned=True))
    segments = appender.Staging().segments(views, aligned(total))
    sources = {np.frombuffer(s, np.uint8).ctypes.data for s in segments}
    starts = {np.frombuffer(data, np.uint8).ctypes.data}
    assert starts <= sources
    # Copied into staging: the head's block and the data's last partial block, no more.
    staged = [s for s in segments if np.frombuffer(s, np.uint8).ctypes.data not in starts]
    assert sum(s.nbytes for s in staged) == 2 * BLOCK
    path = tmp_path / "log"
    fd, direct = log_opened(path, direct)
    try:
        end = appender.append(fd, direct, 0, logfile.encode(event, "s", block_aligned=True))
        second = received_event(2, (5000, 3, 1))
        end += appender.append(fd, direct, end, logfile.encode(second, "s", block_aligned=True))
    finally:
        os.close(fd)
    scan = logfile.scan(logfile.read_file(path), "s")
    assert scan.clean and [e.seq for e in scan.events] == [1, 2]
    for got, want in zip(scan.events, [event, second], strict=True):
        for group in ("grads", "params"):
            expected = getattr(want, group) or {}
            assert list(getattr(got, group) or {}) == list(expected)
            for name, array in expected.items():
                read = getattr(got, group)[name]
                assert read.dtype == array.dtype and read.shape == array.shape
                assert read.tobytes() == array.tobytes()
                assert read.flags.aligned


def test_tensors_from_different_buffers_or_off_a_block_are_laid_out_one_by_one() -> None:
    event = received_event(1)
    assert event.params is not None
    assert logfile.mirrored([*event.grads.values(), *event.params.values()]) is not None
    copied = dataclasses.replace(event, grads={**event.grads, "t1": event.grads["t1"].copy()})
    # The body's first tensor (the param) left out: what is left starts off a block.
    off_block = dataclasses.replace(event, params=None)
    for other in (copied, off_block):
        arrays = [*other.grads.values(), *(other.params or {}).values()]
        assert logfile.mirrored(arrays) is None
        parts = logfile.layout(other, "s", block_aligned=True)
        assert len(parts.body) > 2  # each tensor a buffer of its own (and the gaps between)
        data = np.frombuffer(frame_bytes(other, "s", block_aligned=True), np.uint8)
        (read,) = logfile.scan(data, "s").events
        assert all(read.grads[n].tobytes() == a.tobytes() for n, a in other.grads.items())

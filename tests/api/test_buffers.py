"""The step buffer pool: a buffer is handed out again only once nothing refers to it."""

from __future__ import annotations

import threading

import numpy as np

from service.buffers import BufferPool

MB = 1 << 20


def test_a_released_buffer_is_reused_and_a_held_one_never_is() -> None:
    pool = BufferPool(keep=4, min_bytes=MB)
    first = pool.take(4 * MB)
    address = first.ctypes.data
    view = np.frombuffer(first.data, dtype=np.float32)[10:20]  # a view keeps it referenced
    del first
    second = pool.take(4 * MB)
    assert second.ctypes.data != address
    view[:] = 1.0
    second[:] = 0  # writing the other buffer leaves the held one alone
    assert np.all(view == 1.0)
    del view
    third = pool.take(4 * MB)
    assert third.ctypes.data == address


def test_typed_arrays_keep_their_buffer_referenced() -> None:
    pool = BufferPool(keep=4, min_bytes=MB)
    deltas = pool.array((512, 1024), np.dtype(np.float32))
    assert deltas.shape == (512, 1024) and deltas.dtype == np.float32
    assert deltas.flags.c_contiguous and deltas.flags.writeable
    address = deltas.ctypes.data
    other = pool.take(2 * MB)
    assert other.ctypes.data != address
    del deltas
    assert pool.take(2 * MB).ctypes.data == address
    assert other.nbytes == 2 * MB


def test_sizes_are_matched_exactly_and_small_buffers_are_not_pooled() -> None:
    pool = BufferPool(keep=4, min_bytes=MB)
    big = pool.take(2 * MB)
    address = big.ctypes.data
    del big
    assert pool.take(3 * MB).ctypes.data != address
    small = pool.take(MB - 1)
    assert small.nbytes == MB - 1
    assert len(pool._buffers) == 2  # the small one is the allocator's


def test_the_pool_forgets_its_oldest_buffers_past_keep() -> None:
    pool = BufferPool(keep=2, min_bytes=MB)
    held = [pool.take(MB + i) for i in range(3)]
    assert [b.nbytes for b in pool._buffers] == [MB + 1, MB + 2]
    del held
    assert pool.take(MB + 1).nbytes == MB + 1


def test_threads_taking_at_once_never_share_a_buffer() -> None:
    pool = BufferPool(keep=8, min_bytes=MB)
    taken: list[np.ndarray] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            buffer = pool.take(MB)
            with lock:
                taken.append(buffer)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    addresses = [b.ctypes.data for b in taken]
    assert len(set(addresses)) == len(addresses)  # all still held: all distinct


def test_a_body_is_placed_with_its_tensor_data_on_a_page() -> None:
    from service.api.body import _placed
    from service.buffers import PAGE
    from service.codec import safetensors

    body = safetensors.encode({"w": np.arange(300_000, dtype=np.float32)})
    start = safetensors.data_start(body[:64])
    assert start is not None and start > 8
    view = _placed(len(body), start)
    assert view.nbytes == len(body) and not view.readonly
    assert (np.frombuffer(view, np.uint8).ctypes.data + start) % PAGE == 0
    view[:] = body
    tensors, _ = safetensors.decode(view, max_tensors=4)
    assert tensors["w"].ctypes.data % PAGE == 0
    assert np.array_equal(tensors["w"], np.arange(300_000, dtype=np.float32))


def test_a_body_too_short_to_say_where_its_data_starts_is_placed_anyway() -> None:
    from service.api.body import _placed
    from service.codec import safetensors

    assert safetensors.data_start(b"\x01\x00") is None
    assert safetensors.data_start((1 << 40).to_bytes(8, "little")) is None  # no such header
    assert _placed(3 * MB, None).nbytes == 3 * MB
    assert _placed(3 * MB, 5 * MB).nbytes == 3 * MB  # past the end: not placed

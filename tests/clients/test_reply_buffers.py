"""Reply buffers: reused once the caller has let go of the arrays read from them."""

from __future__ import annotations

import numpy as np
from optserve_client import _buffers

MB = 1 << 20


def test_deltas_the_caller_holds_are_never_overwritten() -> None:
    first = _buffers.reply_buffer(4 * MB)
    deltas = np.frombuffer(first, dtype=np.float32)
    deltas[:] = 1.0
    del first
    second = _buffers.reply_buffer(4 * MB)
    np.frombuffer(second, dtype=np.uint8)[:] = 0
    assert np.all(deltas == 1.0)
    address = deltas.ctypes.data
    del deltas
    del second
    reused = {np.frombuffer(_buffers.reply_buffer(4 * MB), np.uint8).ctypes.data for _ in range(2)}
    assert address in reused


def test_small_replies_get_their_own_buffer() -> None:
    before = len(_buffers._kept)
    buffer = _buffers.reply_buffer(_buffers.POOLED_MIN - 1)
    assert buffer.nbytes == _buffers.POOLED_MIN - 1
    assert len(_buffers._kept) == before

"""How the client hands a step's body to httpx: small bodies whole, large ones as views."""

from __future__ import annotations

import asyncio

import numpy as np
from optserve_client import _transfer


def _parts(size: int) -> list[bytes | memoryview]:
    data = np.arange(size, dtype=np.uint8)
    return [b"header", memoryview(data)]


def test_a_small_body_is_sent_whole() -> None:
    parts = _parts(_transfer.JOINED_MAX // 2)
    for sync in (True, False):
        content = _transfer.request_content(parts, sync)
        assert isinstance(content, bytes)
        assert content == b"".join(parts)


def test_a_large_body_is_sent_as_slices_of_its_parts() -> None:
    parts = _parts(3 * _transfer.SLICE + 5)
    upload = _transfer.request_content(parts, sync=True)
    assert isinstance(upload, _transfer.Upload)
    pieces = list(upload)
    assert len(pieces) > 3
    assert max(p.nbytes for p in pieces) == _transfer.SLICE
    assert all(isinstance(p, memoryview) for p in pieces)
    assert b"".join(pieces) == b"".join(parts)
    assert b"".join(upload) == b"".join(parts)  # re-iterable: a retry sends it again

    async def collect() -> bytes:
        content = _transfer.request_content(parts, sync=False)
        assert isinstance(content, _transfer.AsyncUpload)
        return b"".join([piece async for piece in content])

    assert asyncio.run(collect()) == b"".join(parts)

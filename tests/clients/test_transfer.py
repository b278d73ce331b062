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


def test_a_requests_url_is_the_one_httpx_builds_whatever_the_base_and_query() -> None:
    """Tries builds each distinct URL once (``_tries._url``): the cached URL must be httpx's
    own for that base (a path prefix included) and query, and differ where they differ."""
    import httpx
    from optserve_client._calls import Call
    from optserve_client._retry import RetryPolicy
    from optserve_client._tries import Tries

    bases = ["http://127.0.0.1:9", "http://127.0.0.1:9/prefix/", "http://other:8000/"]
    for base in bases:
        with httpx.Client(base_url=base) as http:
            for params in ({}, {"return": "delta"}, {"return": "params"}):
                call = Call("POST", "/v1/sessions/abc/step", params=params)
                for _ in range(2):  # built, then taken from the cache
                    got = Tries(call, RetryPolicy(), base).request(http).url
                    want = http.build_request("POST", call.path, params=params or None).url
                    assert got == want, (base, params)

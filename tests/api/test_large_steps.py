"""Large safetensors steps: received into one buffer, answered as header plus views.

The numbers must be those of the in-process core whichever way the body arrives (one
piece, many chunks, no declared length), and a replay must answer the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from starlette.requests import Request

from service.api.body import receive_body
from service.api.media import Wire
from service.api.wire import fingerprint, fingerprinter, sha256_fingerprint
from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, make_client, st_body
from tests.api.reference import InProcess

SIZE = 100_000  # 400 kB of float32 gradients: past the threshold of the one-buffer read
CONFIG = {"optimizer": {"name": "Adam", "lr": 0.01}, "params": {"w": {"shape": [SIZE]}}}


def _grads(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(SIZE).astype(np.float32)}


def _pieces(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("sent", ["whole", "chunked"])
def test_large_steps_match_the_core_bit_for_bit(sent: str) -> None:
    reference = InProcess(CONFIG)
    with make_client() as client:
        sid = client.post("/v1/sessions", json=CONFIG).json()["id"]
        for seed in range(3):
            body = st_body(_grads(seed))
            # An iterator is sent chunked, with no Content-Length: the joining path.
            content: Any = body if sent == "whole" else _pieces(body, 50_000)
            response = client.post(
                f"/v1/sessions/{sid}/step",
                content=content,
                headers={"Content-Type": SAFETENSORS, "Accept": SAFETENSORS},
            )
            assert response.status_code == 200, response.text
            assert int(response.headers["content-length"]) == len(response.content)
            tensors, metadata = safetensors.decode(response.content)
            assert metadata["step"] == str(seed + 1)
            np.testing.assert_array_equal(tensors["w"], reference.step(_grads(seed))["w"])


def test_a_replayed_large_step_answers_the_same_bytes() -> None:
    with make_client() as client:
        sid = client.post("/v1/sessions", json=CONFIG).json()["id"]
        headers = {"Content-Type": SAFETENSORS, "Idempotency-Key": "k1"}
        body = st_body(_grads(1))
        first = client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
        again = client.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        other = client.post(f"/v1/sessions/{sid}/step", content=st_body(_grads(2)), headers=headers)
        assert other.status_code == 422, other.text  # same key, another body


def _request(chunks: list[bytes], declared: int | None) -> Request:
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    app = SimpleNamespace(state=SimpleNamespace(settings=SimpleNamespace(body_timeout_s=5.0)))
    scope = {"type": "http", "method": "POST", "headers": headers, "app": app}
    return Request(scope, receive)


@pytest.mark.parametrize(
    ("declared_delta", "label"), [(0, "exact"), (-1000, "surplus"), (1000, "short")]
)
def test_receive_body_keeps_exactly_the_bytes_that_came(declared_delta: int, label: str) -> None:
    """uvicorn never delivers more or fewer bytes than declared; were it to, no byte is
    lost or invented."""
    body = np.random.default_rng(0).bytes(300_000)
    chunks = list(_pieces(body, 65536))
    got = asyncio.run(receive_body(_request(chunks, len(body) + declared_delta)))
    assert bytes(got) == body, label


def test_decoded_views_of_the_receive_buffer_are_read_only() -> None:
    body = st_body(_grads(0))
    got = asyncio.run(receive_body(_request(list(_pieces(body, 65536)), len(body))))
    assert not isinstance(got, bytes)  # the one-buffer path
    tensors, _ = safetensors.decode(got)
    assert not tensors["w"].flags.writeable
    np.testing.assert_array_equal(tensors["w"], _grads(0)["w"])


def test_the_sha256_fingerprint_is_the_one_earlier_servers_recorded() -> None:
    """Keys recorded before XXH3 are recognised by recomputing their hash exactly."""
    body = st_body(_grads(3))
    earlier = hashlib.sha256(b"application/vnd.optserve.safetensors")
    earlier.update(b"\ndelta\n")
    earlier.update(body)
    assert sha256_fingerprint(body, Wire.SAFETENSORS, "delta") == earlier.hexdigest()
    assert fingerprint(body, Wire.SAFETENSORS, "delta") != earlier.hexdigest()
    assert fingerprint(body, Wire.SAFETENSORS, "params") != fingerprint(
        body, Wire.SAFETENSORS, "delta"
    )


@pytest.mark.parametrize("declared_delta", [0, -7, 5])
def test_a_fingerprint_fed_chunk_by_chunk_is_the_whole_body_one(declared_delta: int) -> None:
    body = st_body(_grads(4))
    chunks = list(_pieces(body, 65536))
    digest = fingerprinter(Wire.SAFETENSORS, "delta")
    request = _request(chunks, len(body) + declared_delta)
    got = asyncio.run(receive_body(request, None, "", safetensors.data_start, digest.update))
    assert bytes(got) == body
    assert digest.hexdigest() == fingerprint(body, Wire.SAFETENSORS, "delta")


async def _step_in_process(app: Any, path: str, chunks: list[bytes]) -> tuple[int, int]:
    """One step through the ASGI app, its body in ``chunks`` as uvicorn delivers it, the
    reply's parts counted but not joined: the status and the reply's length."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    got: dict[str, int] = {"status": 0, "bytes": 0}

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            got["status"] = message["status"]
        else:
            got["bytes"] += memoryview(message.get("body", b"")).nbytes

    headers = [
        (b"content-type", SAFETENSORS.encode()),
        (b"accept", SAFETENSORS.encode()),
        (b"content-length", str(sum(map(len, chunks))).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return got["status"], got["bytes"]


def test_a_large_step_allocates_one_receive_buffer_and_the_deltas() -> None:
    """No full-size transient beyond those two: no join of the body's chunks, no joined
    reply, no copy of the gradients (measured with tracemalloc, which numpy reports to;
    the body's chunks are the sender's, allocated before)."""
    size = 1_000_000
    config = {"optimizer": {"name": "Adam", "lr": 0.01}, "params": {"w": {"shape": [size]}}}
    body = st_body({"w": np.random.default_rng(0).standard_normal(size).astype(np.float32)})
    with make_client() as client:
        sid = client.post("/v1/sessions", json=config).json()["id"]
        path = f"/v1/sessions/{sid}/step"
        assert client.portal is not None
        for _ in range(2):  # the optimizer's state and the allocator's pools are in place
            client.portal.call(_step_in_process, client.app, path, list(_pieces(body, 65536)))
        chunks = list(_pieces(body, 65536))  # uvicorn's, allocated before the step
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            status, sent = client.portal.call(_step_in_process, client.app, path, chunks)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    assert status == 200 and sent > size * 4
    full = size * 4
    # The receive buffer and the deltas are two; Adam's block-sized scratch adds part of
    # one. A third full-size buffer (a join, a copy) would pass three.
    assert peak < 3 * full, f"{peak / full:.2f} full-size buffers at the peak"

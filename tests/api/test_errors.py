"""Every error status the API answers, each as an RFC 9457 problem document."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.sessions.models import Limits
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store.base import Event
from service.sessions.store.memory import MemoryStore
from tests.api.conftest import (
    SAFETENSORS,
    StrictJSONClient,
    adam_config,
    auth,
    grads,
    make_client,
    problem,
    st_body,
    st_headers,
)

Create = Callable[..., dict[str, Any]]
JSON_GRADS = {"grads": {n: v.tolist() for n, v in grads().items()}}


def test_401_without_or_with_a_wrong_key(keyed: TestClient) -> None:
    missing = problem(keyed.get("/v1/sessions"), 401, "unauthorized")
    assert keyed.get("/v1/sessions").headers["www-authenticate"] == 'Bearer realm="optserve"'
    assert missing["detail"]
    wrong = keyed.get("/v1/sessions", headers=auth("key-x"))
    problem(wrong, 401)
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    problem(keyed.get("/v1/sessions", headers={"Authorization": "Basic a2V5LWE="}), 401)
    problem(keyed.get("/v1/sessions", headers={"Authorization": "Bearer "}), 401)
    problem(keyed.post("/v1/sessions", json=adam_config()), 401)
    assert keyed.get("/v1/sessions", headers=auth("key-a")).status_code == 200
    # Probes and scrapers carry no key.
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_400_for_unreadable_bodies(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    url = f"/v1/sessions/{sid}/step"
    json_type = {"Content-Type": "application/json"}
    for body in [b"{", b"[1, 2]", b"\xff\xfe", b'"grads"', b"[" * 60_000]:
        problem(client.post(url, content=body, headers=json_type), 400, "malformed-body")
    truncated = st_body(grads())[:-3]
    problem(client.post(url, content=truncated, headers=st_headers()), 400, "malformed-body")
    problem(client.post("/v1/sessions", content=b"{", headers=json_type), 400)


def test_404_for_unknown_routes_and_405_for_wrong_methods(client: TestClient) -> None:
    problem(client.get("/v2/nothing"), 404, "not-found")
    wrong = problem(client.put("/v1/sessions"), 405, "method-not-allowed")
    assert wrong["instance"] == "/v1/sessions"


def test_406_for_unsupported_accept(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    problem(
        client.post(f"/v1/sessions/{sid}/step", json=JSON_GRADS, headers={"Accept": "text/csv"}),
        406,
    )
    problem(
        client.get(f"/v1/sessions/{sid}", headers={"Accept": SAFETENSORS}), 406, "not-acceptable"
    )
    problem(client.get("/v1/optimizers", headers={"Accept": "image/png"}), 406)
    assert (
        client.get(f"/v1/sessions/{sid}", headers={"Accept": "text/html, */*;q=0.1"}).status_code
        == 200
    )
    assert client.get(f"/v1/sessions/{sid}/step".rsplit("/", 1)[0]).status_code == 200
    assert (
        client.get(f"/v1/sessions/{sid}", headers={"Accept": "application/json;q=0"}).status_code
        == 406
    )
    assert client.get(f"/v1/sessions/{sid}/state", headers={"Accept": "*/*"}).status_code == 200


def test_409_for_a_step_in_flight_with_the_same_key() -> None:
    gate = threading.Event()

    class SlowStore(MemoryStore):
        durable = True  # appends run on the store's own thread, so they can be held up

        def append(self, session_id: str, event: Event) -> int:
            gate.wait(timeout=10)
            return super().append(session_id, event)

    service = SessionService(Runtime(SlowStore()), Limits())
    app = create_app(Settings(storage="memory", access_log=False), service)

    async def scenario() -> tuple[int, int, int]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as c,
        ):
            sid = (await c.post("/v1/sessions", json=adam_config())).json()["id"]
            url = f"/v1/sessions/{sid}/step"
            headers = {"Idempotency-Key": "same"}
            first = asyncio.create_task(c.post(url, json=JSON_GRADS, headers=headers))
            await asyncio.sleep(0.2)
            second = await c.post(url, json=JSON_GRADS, headers=headers)
            gate.set()
            done = await first
            third = await c.post(url, json=JSON_GRADS, headers=headers)
            problem(second, 409, "step-in-flight")
            assert second.headers["retry-after"] == "1"
            return done.status_code, second.status_code, third.status_code

    assert asyncio.run(scenario()) == (200, 409, 200)


def test_413_for_a_declared_length_over_the_limit() -> None:
    with make_client(max_body_bytes=4096) as client:
        sid = client.post("/v1/sessions", json=adam_config()).json()["id"]
        big = st_body({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3000, np.float32)})
        response = client.post(f"/v1/sessions/{sid}/step", content=big, headers=st_headers())
        document = problem(response, 413, "body-too-large")
        assert document["maximum"] == 4096
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_413_for_a_streamed_body_without_length() -> None:
    """A chunked body has no Content-Length: the bytes are counted as they arrive."""
    with make_client(max_body_bytes=4096) as client:
        sid = client.post("/v1/sessions", json=adam_config()).json()["id"]

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b" " * 1000

        response = client.post(
            f"/v1/sessions/{sid}/step",
            content=chunks(),
            headers={"Content-Type": "application/json"},
        )
        problem(response, 413)
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
        create = client.post(
            "/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        problem(create, 413)


def test_415_for_unsupported_content_types(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    for content_type in ["text/plain", "application/xml", "multipart/form-data", ""]:
        response = client.post(
            f"/v1/sessions/{sid}/step", content=b"{}", headers={"Content-Type": content_type}
        )
        document = problem(response, 415, "unsupported-media-type")
        assert SAFETENSORS in document["supported"]
    problem(client.post("/v1/sessions", content=b"x", headers={"Content-Type": "text/csv"}), 415)
    problem(
        client.post("/v1/schedules/preview", content=b"x", headers={"Content-Type": SAFETENSORS}),
        415,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "grads"),
        ({"grads": {"w": [[1, 2, 3], [4, 5, 6]]}}, "grads.b"),
        ({"grads": {"w": [[1, 2], [3, 4]], "b": [1, 2, 3]}}, "grads.w"),
        ({"grads": {"w": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3], "c": [1]}}, "grads.c"),
        ({"grads": {"w": [[1, 2, 3], [4, 5, 6]], "b": [1, "2", 3]}}, "grads.b"),
        ({"grads": {"w": [[1, 2, 3], [4, 5, 6]], "b": [1, True, 3]}}, "grads.b"),
        ({"grads": {"w": [[1, 2, 3], [4, 5]], "b": [1, 2, 3]}}, "grads.w"),
        ({"grads": {"w": [[1, 2, 3], [4, 5, 6]], "b": [1, None, 3]}}, "grads.b"),
        ({"grads": {"w": 1, "b": [1, 2, 3]}}, "grads.w"),
        ({"grads": "all of them"}, "grads"),
        ({"grads": {"w": [1] * 6, "b": [1] * 3}, "loss": "low"}, "loss"),
        ({"grads": {"w": [1] * 6, "b": [1] * 3}, "momentum": 1}, "momentum"),
        ({"grads": {"w": [1] * 6, "b": [1] * 3}, "params": [1, 2]}, "params"),
        (b'{"grads": {"w": [[1e400, 1, 1], [1, 1, 1]], "b": [1, 2, 3]}}', "grads.w"),
        (b'{"grads": {"w": [1, 1, 1, 1, 1, 1], "b": [1, 2, 1' + b"0" * 400 + b"]}}", "grads.b"),
        (b'{"grads": {"w": [1, 1, 1, 1, 1, 1], "b": [1, 2, 3]}, "loss": 1e999}', "loss"),
    ],
)
def test_422_names_the_field(client: TestClient, create: Create, body: Any, field: str) -> None:
    sid = create()["id"]
    url = f"/v1/sessions/{sid}/step"
    if isinstance(body, bytes):
        response = client.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(url, json=body)
    document = problem(response, 422)
    assert field in [e["field"] for e in document["errors"]], document


def test_422_for_limits() -> None:
    with make_client(
        max_tensors_per_session=2, max_elements_per_session=10, max_sessions_per_tenant=1
    ) as client:
        config = adam_config()
        config["params"]["c"] = {"shape": [1]}
        assert problem(client.post("/v1/sessions", json=config), 422, "limit-exceeded")["limit"]
        big = adam_config(params={"w": {"shape": [11]}})
        problem(client.post("/v1/sessions", json=big), 422, "limit-exceeded")
        assert (
            client.post("/v1/sessions", json=adam_config(params={"w": {"shape": [3]}})).status_code
            == 201
        )
        problem(
            client.post("/v1/sessions", json=adam_config(params={"w": {"shape": [3]}})),
            422,
            "limit-exceeded",
        )


def test_503_when_the_store_fails_and_nothing_is_applied() -> None:
    class FlakyStore(MemoryStore):
        failing = False

        def append(self, session_id: str, event: Event) -> int:
            if self.failing:
                raise OSError("disk full")
            return super().append(session_id, event)

    store = FlakyStore()
    app = create_app(
        Settings(storage="memory", access_log=False), SessionService(Runtime(store), Limits())
    )
    with StrictJSONClient(app) as client:
        sid = client.post("/v1/sessions", json=adam_config()).json()["id"]
        assert client.post(f"/v1/sessions/{sid}/step", json=JSON_GRADS).status_code == 200
        before = client.get(f"/v1/sessions/{sid}/state").content
        store.failing = True
        response = client.post(f"/v1/sessions/{sid}/step", json=JSON_GRADS)
        problem(response, 503, "storage-unavailable")
        assert response.headers["retry-after"] == "1"
        store.failing = False
        assert client.get(f"/v1/sessions/{sid}/state").content == before


def test_problem_documents_carry_the_request_id(client: TestClient) -> None:
    response = client.get("/v1/sessions/nope", headers={"X-Request-ID": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert problem(response, 404)["request_id"] == "trace-42"
    generated = client.get("/v1/sessions/nope", headers={"X-Request-ID": "bad id\u0001"})
    assert generated.headers["x-request-id"] != "bad id\u0001"
    assert len(generated.headers["x-request-id"]) == 16


def test_a_client_that_disconnects_mid_body_is_no_server_error() -> None:
    from starlette.requests import ClientDisconnect

    from service.api.errors import render

    assert render(ClientDisconnect()).status_code == 400

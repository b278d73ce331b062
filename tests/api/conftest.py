"""Fixtures: an in-memory app behind TestClient, open or with API keys.

Every response any API test receives is checked by :class:`StrictJSONClient`: a JSON
body (documents and problems alike) must parse with a strict parser that refuses
``NaN``, ``Infinity`` and ``-Infinity``, and so must a safetensors header and each of its
metadata values that is JSON, as every language's JSON parser would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.codec import safetensors
from service.config import Settings

SAFETENSORS = "application/vnd.optserve.safetensors"
KEYS = "alice:key-a,bob:key-b"


OPTIM_DB_TALLY = pytest.StashKey[dict[str, int]]()
"""Outcomes of tests/api/test_optim_db.py's cases, printed at the end of the run."""


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"not JSON every language parses: the token {token}")


def strict_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_refuse_constant)


def check_strict_body(response: Any) -> None:
    """Assert that a JSON or safetensors response holds only JSON any parser accepts."""
    media = response.headers.get("content-type", "").split(";")[0].strip()
    body = response.content
    if not body:
        return
    if media in ("application/json", "application/problem+json"):
        strict_json(body)
    elif media in (SAFETENSORS, "application/octet-stream") and len(body) >= 8:
        size = int.from_bytes(body[:8], "little")
        header = strict_json(body[8 : 8 + size])
        for value in header.get("__metadata__", {}).values():
            if isinstance(value, str) and value[:1] in ("[", "{"):
                strict_json(value)


class StrictJSONClient(TestClient):
    """TestClient whose every response is checked by :func:`check_strict_body`."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        response = super().request(*args, **kwargs)
        check_strict_body(response)
        return response


def make_client(**settings: Any) -> TestClient:
    options: dict[str, Any] = {"storage": "memory", "access_log": False, **settings}
    return StrictJSONClient(create_app(Settings(**options)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    counts = config.stash.get(OPTIM_DB_TALLY, None)
    if counts:
        terminalreporter.write_line(
            "optim_db through the server: {} cases run, {} matched torch, {} mismatched, "
            "{} refused as documented".format(
                counts.get("run", 0),
                counts.get("matched", 0),
                counts.get("mismatched", 0),
                counts.get("refused", 0),
            )
        )


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@pytest.fixture
def keyed() -> Iterator[TestClient]:
    """A server with two tenants, alice (key-a) and bob (key-b); no default auth header."""
    with make_client(api_keys=KEYS) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def adam_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "optimizer": {"name": "Adam", "lr": 0.01},
        "params": {"w": {"shape": [2, 3]}, "b": {"shape": [3]}},
    }
    config.update(extra)
    return config


@pytest.fixture
def create(client: TestClient) -> Callable[..., dict[str, Any]]:
    def make(config: dict[str, Any] | None = None, **headers: str) -> dict[str, Any]:
        response = client.post("/v1/sessions", json=config or adam_config(), headers=headers)
        assert response.status_code == 201, response.text
        document: dict[str, Any] = response.json()
        return document

    return make


def grads(seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((2, 3)).astype(dtype),
        "b": rng.standard_normal(3).astype(dtype),
    }


def st_body(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    return safetensors.encode(tensors, metadata)


def st_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": SAFETENSORS, "Accept": SAFETENSORS, **extra}


def problem(response: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    """Assert ``response`` is a problem document with ``status`` (and type slug)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, Any] = response.json()
    assert document["status"] == status
    assert document["title"] and "detail" in document
    if slug is not None:
        assert document["type"] == f"/problems/{slug}", document
    return document

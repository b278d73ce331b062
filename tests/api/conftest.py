"""Fixtures: an in-memory app behind TestClient, open or with API keys."""

from __future__ import annotations

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


def make_client(**settings: Any) -> TestClient:
    options: dict[str, Any] = {"storage": "memory", "access_log": False, **settings}
    return TestClient(create_app(Settings(**options)))


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

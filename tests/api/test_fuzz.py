"""Schemathesis against the app in-process: no request it can build may produce a 5xx, and
every answer must match the documented status codes, media types and schemas.

Operations on one session run half the time against a real session (created once), so
step bodies reach the decoders and the sessions layer rather than stopping at 404.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.config import Settings

# safetensors bodies are bytes on the wire, like application/octet-stream.
schemathesis.serializer.alias("application/vnd.optserve.safetensors", "application/octet-stream")

app = create_app(Settings(storage="memory", access_log=False, max_body_bytes=1 << 20))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "Adam", "lr": 0.01},
    "params": {"w": {"shape": [2], "data": [1.0, 2.0]}},
}


def _session_id() -> str:
    """A live session (the app's lifespan, and its sessions, end with each test)."""
    with asgi.get_client(app) as client:
        response = client.post(f"http://{asgi.HOST}/v1/sessions", json=CONFIG)
        assert response.status_code == 201, response.text
        session_id: str = response.json()["id"]
        return session_id


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_api(case: schemathesis.Case) -> None:
    if case.path_parameters and "session_id" in case.path_parameters and random.random() < 0.5:
        case.path_parameters["session_id"] = _session_id()
    case.call_and_validate(checks=CHECKS)

"""Health, readiness, metrics, request ids and the access log."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from service.api.logs import JsonFormatter
from tests.api.conftest import adam_config, make_client


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readyz_is_503_when_the_store_is_unreachable(client: TestClient) -> None:
    client.app.state.service.store.close()  # type: ignore[attr-defined]
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    client.app.state.service.store.open()  # type: ignore[attr-defined]


def test_metrics_count_requests_by_route_and_status_and_steps(client: TestClient) -> None:
    sid = client.post("/v1/sessions", json=adam_config()).json()["id"]
    body = {"grads": {"w": [0.0] * 6, "b": [0.0] * 3}}
    client.post(f"/v1/sessions/{sid}/step", json=body)
    client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Idempotency-Key": "a"})
    client.post(f"/v1/sessions/{sid}/step", json=body, headers={"Idempotency-Key": "a"})
    client.get("/v1/sessions/missing")
    text = client.get("/metrics").text
    route = "/v1/sessions/{session_id}/step"
    assert f'optserve_http_requests_total{{method="POST",route="{route}",status="200"}} 3.0' in text
    assert (
        'optserve_http_requests_total{method="GET",route="/v1/sessions/{session_id}",status="404"}'
        in text
    )
    assert 'optserve_steps_total{outcome="applied"} 2.0' in text
    assert 'optserve_steps_total{outcome="replayed"} 1.0' in text
    assert "optserve_sessions_created_total 1.0" in text
    assert "optserve_http_request_duration_seconds_bucket" in text


def test_each_app_has_its_own_metrics() -> None:
    with make_client() as first, make_client() as second:
        first.get("/healthz")
        assert 'route="/healthz"' in first.get("/metrics").text
        assert 'route="/healthz"' not in second.get("/metrics").text


def test_access_log_is_json_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    with make_client(access_log=True) as client, caplog.at_level(logging.INFO, "optserve.access"):
        client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    records = [r for r in caplog.records if r.name == "optserve.access"]
    assert records, "no access log line"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["request_id"] == "abc-123"
    assert line["status"] == 200 and line["route"] == "/healthz" and line["level"] == "info"


def test_metrics_carry_no_created_series_and_count_live_sessions(client: TestClient) -> None:
    def gauge(text: str, name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    before = client.get("/metrics").text
    ids = [client.post("/v1/sessions", json=adam_config()).json()["id"] for _ in range(3)]
    client.delete(f"/v1/sessions/{ids[0]}")
    text = client.get("/metrics").text
    assert "_created" not in text.replace("optserve_sessions_created_total", "")
    assert "optserve_sessions_created_total 3.0" in text
    assert gauge(text, "optserve_sessions_live") == gauge(before, "optserve_sessions_live") + 2
    assert gauge(text, "optserve_sessions_loaded") >= 2

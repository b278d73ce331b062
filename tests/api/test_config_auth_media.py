"""Settings, key tables, exposure refusal and media negotiation, without a server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from starlette.requests import Request

from service.api.auth import KeyFileError, KeyTable, parse_key_pairs
from service.api.media import Wire, request_wire, response_wire
from service.api.problems import NotAcceptable, UnsupportedMediaType
from service.cli import _log_numerics, _parser, check_exposure, settings_from_args
from service.config import Settings
from service.core import machine, native


def test_settings_read_the_environment_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_PORT", "9001")
    monkeypatch.setenv("OPTSERVE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("OPTSERVE_LOG_LEVEL", "WARNING")
    settings = settings_from_args(_parser().parse_args(["serve", "--data-dir", "/tmp/x"]))
    assert settings.port == 9001 and settings.max_body_bytes == 2048
    assert settings.log_level == "warning" and settings.data_dir == Path("/tmp/x")
    flagged = settings_from_args(_parser().parse_args(["serve", "--port", "9002"]))
    assert flagged.port == 9002


def test_key_pairs_and_files(tmp_path: Path) -> None:
    assert parse_key_pairs(["a:k1", " b : k2 ", "", "# note"], "env") == {"k1": "a", "k2": "b"}
    with pytest.raises(KeyFileError):
        parse_key_pairs(["no-colon"], "env")
    with pytest.raises(KeyFileError):
        parse_key_pairs(["a:k", "b:k"], "env")
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenants\ncarol:k3\n")
    table = KeyTable.from_settings("a:k1", keys_file)
    assert table.tenant_for("k1") == "a" and table.tenant_for("k3") == "carol"
    assert table.tenant_for("k") is None and not table.open
    assert KeyTable.from_settings("", None).open
    with pytest.raises(KeyFileError):
        KeyTable.from_settings("", tmp_path / "missing")


@pytest.mark.parametrize(
    ("host", "keys", "insecure", "refused"),
    [
        ("127.0.0.1", "", False, False),
        ("localhost", "", False, False),
        ("::1", "", False, False),
        ("0.0.0.0", "", False, True),
        ("0.0.0.0", "", True, False),
        ("0.0.0.0", "t:k", False, False),
        ("example.internal", "", False, True),
    ],
)
def test_open_server_refuses_non_loopback_without_insecure(
    host: str, keys: str, insecure: bool, refused: bool
) -> None:
    settings = Settings(host=host, api_keys=keys, insecure=insecure)
    table = KeyTable.from_settings(settings.api_keys, None)
    assert (check_exposure(settings, table) is not None) == refused


def _request(**headers: str) -> Request:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


@pytest.mark.parametrize(
    ("content_type", "wire"),
    [
        ("application/json", Wire.JSON),
        ("application/json; charset=utf-8", Wire.JSON),
        ("Application/JSON", Wire.JSON),
        ("application/vnd.optserve.safetensors", Wire.SAFETENSORS),
        ("application/octet-stream", Wire.SAFETENSORS),
    ],
)
def test_request_wire(content_type: str, wire: Wire) -> None:
    assert request_wire(_request(content_type=content_type)) is wire


def test_request_wire_refuses_other_types() -> None:
    for content_type in ["text/plain", "application/jsonx", ""]:
        with pytest.raises(UnsupportedMediaType):
            request_wire(_request(content_type=content_type))
    with pytest.raises(UnsupportedMediaType):
        request_wire(_request(content_type="application/octet-stream"), (Wire.JSON,))


@pytest.mark.parametrize(
    ("accept", "default", "expected"),
    [
        ("", Wire.SAFETENSORS, Wire.SAFETENSORS),
        ("*/*", Wire.SAFETENSORS, Wire.SAFETENSORS),
        ("application/*", Wire.JSON, Wire.JSON),
        ("application/json", Wire.SAFETENSORS, Wire.JSON),
        ("application/octet-stream", Wire.JSON, Wire.SAFETENSORS),
        (
            "application/json;q=0.5, application/vnd.optserve.safetensors",
            Wire.JSON,
            Wire.SAFETENSORS,
        ),
        ("application/json, */*;q=0.1", Wire.SAFETENSORS, Wire.JSON),
        ("text/html, */*;q=0.8", Wire.SAFETENSORS, Wire.SAFETENSORS),
    ],
)
def test_response_wire(accept: str, default: Wire, expected: Wire) -> None:
    assert response_wire(_request(accept=accept), default) is expected


@pytest.mark.parametrize("accept", ["text/csv", "application/json;q=0", "image/*", "a;q=x"])
def test_response_wire_406(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        response_wire(_request(accept=accept), Wire.JSON)


def test_cors_is_off_by_default_and_answers_preflights_when_configured() -> None:
    from tests.api.conftest import make_client

    with make_client() as closed:
        response = closed.get("/healthz", headers={"Origin": "https://app.example"})
        assert "access-control-allow-origin" not in response.headers
    with make_client(cors_origins="https://app.example", api_keys="t:k") as client:
        preflight = client.options(
            "/v1/sessions/x/step",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, idempotency-key, content-type",
            },
        )
        assert preflight.status_code == 200
        assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
        answer = client.get(
            "/v1/sessions", headers={"Origin": "https://app.example", "Authorization": "Bearer k"}
        )
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "etag" in answer.headers["access-control-expose-headers"].lower()
        other = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_the_server_logs_its_numerics_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """Replicas replay each other's sessions: the start log lets an operator compare what
    numpy and BLAS run with on each."""
    with caplog.at_level(logging.INFO, logger="optserve.numerics"):
        _log_numerics()
    (record,) = [r for r in caplog.records if r.name == "optserve.numerics"]
    assert record.getMessage() == "numerics"
    fields = record.__dict__
    assert fields["numpy"] == machine.describe()["numpy"]
    assert fields["replica_environment"] is machine.describe()["replica_environment"]
    assert {"simd", "blas", "environment"} <= fields.keys()
    assert fields["native_kernels"] is (native.kernels is not None)

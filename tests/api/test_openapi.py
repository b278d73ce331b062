"""The committed clients/openapi.json is the app's document, and the export script says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api import openapi

COMMITTED = Path(__file__).resolve().parents[2] / "clients" / "openapi.json"


def test_committed_document_matches_the_app() -> None:
    assert COMMITTED.read_text() == openapi.render(), (
        "clients/openapi.json is stale: python -m service.api.openapi --write"
    )


def test_document_describes_every_route_and_problem_responses() -> None:
    document = json.loads(openapi.render())
    assert set(document["paths"]) >= {
        "/v1/sessions",
        "/v1/sessions/{session_id}",
        "/v1/sessions/{session_id}/step",
        "/v1/sessions/{session_id}/params",
        "/v1/sessions/{session_id}/state",
        "/v1/sessions/{session_id}/schedule/step",
        "/v1/optimizers",
        "/v1/schedules",
        "/v1/schedules/preview",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    step = document["paths"]["/v1/sessions/{session_id}/step"]["post"]
    assert set(step["requestBody"]["content"]) == {
        "application/json",
        "application/vnd.optserve.safetensors",
    }
    assert "application/problem+json" in step["responses"]["422"]["content"]
    assert step["security"] == [{"bearer": []}]


def test_check_mode_detects_a_stale_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    assert openapi.main(["--check", str(stale)]) == 1
    assert openapi.main(["--write", str(stale)]) == 0
    assert openapi.main(["--check", str(stale)]) == 0
    assert "matches" in capsys.readouterr().out

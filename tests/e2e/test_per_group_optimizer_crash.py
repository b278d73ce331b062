"""A session of Muon and AdamW groups, SIGKILLed halfway, ends where torch ends.

The server is killed after half of the steps (snapshots every 7 events, so recovery
replays a tail of the log), started again on the same data directory, and the run
continues. The held parameters after every step equal torch's Muon and AdamW stepped
together, each with its own OneCycleLR (or the committed golden fixture without torch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.codec import safetensors
from tests.core.cases.per_group import CASES
from tests.core.parity_inputs import make_inputs
from tests.core.test_parity import TOLERANCE, _reference
from tests.e2e.server_process import ServerProcess, running_server

SAFETENSORS = "application/vnd.optserve.safetensors"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path, {"OPTSERVE_SNAPSHOT_EVERY": "7"}) as running:
        yield running


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_killed_server_continues_muon_and_adamw_exactly(
    server: ServerProcess, dtype: str
) -> None:
    case = next(c for c in CASES if c.id == f"per-group-muon-adamw-onecycle-{dtype}")
    inputs = make_inputs(case)
    params = {
        n: {"shape": list(v.shape), "data": v.ravel().tolist()} for n, v in inputs.initial.items()
    }
    headers = {"Content-Type": SAFETENSORS, "Accept": SAFETENSORS}
    half = inputs.steps // 2

    def run(steps: range, sid: str | None) -> str:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            if sid is None:
                created = http.post("/v1/sessions", json={**case.config, "params": params})
                assert created.status_code == 201, created.text
                sid = str(created.json()["id"])
            for n in steps:
                body = safetensors.encode(inputs.grads[n])
                step = http.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
                assert step.status_code == 200, step.text
        return sid

    sid = run(range(half), None)
    server.kill()
    server.start()
    run(range(half, inputs.steps), sid)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        held = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS})
        assert http.get(f"/v1/sessions/{sid}").json()["step"] == inputs.steps
    tensors, _ = safetensors.decode(held.content)
    for name, expected in _reference(case).items():
        np.testing.assert_allclose(np.asarray(tensors[name]), expected, **TOLERANCE[dtype])

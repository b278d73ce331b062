"""A server killed after group edits, an added group and partial steps comes back bit for bit.

The session is changed the ways a torch loop changes its optimizer (hand edits, an added
group, steps that leave tensors out), with snapshots taken in between (every 3 events),
then the server gets SIGKILL and starts again on the same data directory. The checkpoint
(every state array, the config with the added group, the groups' hyperparameters, the
change log) and the session document are what they were before the kill.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.server_process import ServerProcess, running_server

SHAPES = {"w": (30, 20), "b": (20,)}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path, {"OPTSERVE_SNAPSHOT_EVERY": "3"}) as running:
        yield running


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> list[float]:
    return [float(x) for x in rng.standard_normal(shape).ravel()]


def test_a_killed_server_recovers_edits_added_groups_and_partial_steps(
    server: ServerProcess,
) -> None:
    rng = np.random.default_rng(0)
    params = {n: {"shape": list(s), "data": _values(rng, s)} for n, s in SHAPES.items()}
    config: dict[str, Any] = {
        "optimizer": {"name": "Adam", "lr": 0.01, "weight_decay": 0.01},
        "schedule": {"name": "StepLR", "step_size": 4, "gamma": 0.5},
        "params": params,
        "dtype": "float64",
        "missing_grads": "skip",
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=config).json()["id"]
        shapes = dict(SHAPES)
        for n in range(14):
            if n == 3:
                edit = http.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.03})
                assert edit.status_code == 200, edit.text
            if n == 6:
                head = {"shape": [20, 5], "data": _values(rng, (20, 5))}
                body = {"params": {"head": head}, "lr": 0.002, "reason": "unfreeze"}
                added = http.post(f"/v1/sessions/{sid}/param_groups", json=body)
                assert added.status_code == 200, added.text
                shapes["head"] = (20, 5)
            present = [name for i, name in enumerate(shapes) if (n + i) % 3]
            grads = {name: _values(rng, shapes[name]) for name in present}
            step = http.post(f"/v1/sessions/{sid}/step", json={"grads": grads})
            assert step.status_code == 200, step.text
        state = http.get(f"/v1/sessions/{sid}/state").content
        document = http.get(f"/v1/sessions/{sid}").json()
        changes = http.get(f"/v1/sessions/{sid}/changes").json()
    server.kill()
    server.start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get(f"/v1/sessions/{sid}/state").content == state
        assert http.get(f"/v1/sessions/{sid}").json() == document
        assert http.get(f"/v1/sessions/{sid}/changes").json() == changes

"""Kill a real server with SIGKILL in the middle of a federated round and start it again on
the same data directory: the round keeps every update it acknowledged, a retry of one is
still a duplicate, the round then closes as if nothing had happened; a round whose
timeout passed while the server was down closes when it comes back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.codec import safetensors
from service.config import Settings
from tests.e2e.server_process import ServerProcess, running_server

SAFETENSORS = "application/vnd.optserve.safetensors"
SHAPES = {"w": (8, 5), "b": (5,)}


def session_config(aggregation: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "optimizer": {"name": "FedAdam", "eta": 0.05},
        "params": {
            name: {"shape": list(shape), "data": rng.standard_normal(shape).ravel().tolist()}
            for name, shape in SHAPES.items()
        },
        "aggregation": aggregation,
    }


def update_body(client: int, round_: int) -> bytes:
    rng = np.random.default_rng([client, round_])
    tensors = {f"delta/{k}": rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    meta = {"client_id": f"c{client}", "round": str(round_), "num_examples": str(10 * client)}
    return safetensors.encode(tensors, meta)


def post_update(http: Any, url: str, client: int, round_: int) -> dict[str, Any]:
    response = http.post(
        url, content=update_body(client, round_), headers={"Content-Type": SAFETENSORS}
    )
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def params_of(http: Any, base: str) -> dict[str, np.ndarray]:
    response = http.get(base + "/round/params", headers={"Accept": SAFETENSORS})
    assert response.status_code == 200, response.text
    tensors, _ = safetensors.decode(response.content)
    return tensors


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path, args=["--storage", "disk"]) as running:
        yield running


PRIVATE = {
    "mode": "rounds",
    "clients_per_round": 3,
    "aggregator": {"name": "FedMedian"},
    "privacy": {"clipping": "fixed", "clipping_norm": 2.0, "noise_multiplier": 1.0, "seed": 5},
}


@pytest.mark.parametrize("aggregation", [{"mode": "rounds", "clients_per_round": 3}, PRIVATE])
def test_sigkill_mid_round_loses_no_accepted_update(
    server: ServerProcess, aggregation: dict[str, Any]
) -> None:
    """Also with a robust aggregator and seeded DP noise: the noise after the restart is
    the noise an uninterrupted run draws."""
    config = session_config(aggregation)
    # The same rounds in process, never interrupted: what the params must end as.
    with TestClient(create_app(Settings(storage="memory", access_log=False))) as local:
        ref = "/v1/sessions/" + local.post("/v1/sessions", json=config).json()["id"]
        for round_, client in [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]:
            post_update(local, ref + "/updates", client, round_)
        expected = params_of(local, ref)

    sid = httpx.post(server.url + "/v1/sessions", json=config).json()["id"]
    base = f"{server.url}/v1/sessions/{sid}"
    for round_, client in [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5)]:
        post_update(httpx, base + "/updates", client, round_)
    before = httpx.get(base + "/round").json()
    assert (before["round"], before["clients"]) == (2, ["c4", "c5"])
    server.kill()
    server.start()
    base = f"{server.url}/v1/sessions/{sid}"
    after = httpx.get(base + "/round").json()
    assert (after["round"], after["received"], after["clients"]) == (2, 2, ["c4", "c5"])
    assert after["version"] == before["version"] == 1
    assert post_update(httpx, base + "/updates", 5, 2)["duplicate"]
    closing = post_update(httpx, base + "/updates", 6, 2)
    assert closing["round_closed"] and closing["version"] == 2
    got = params_of(httpx, base)
    for name, values in expected.items():
        assert got[name].tobytes() == values.tobytes(), name
    history = httpx.get(base + "/rounds").json()["rounds"]
    assert [len(r["participants"]) for r in history] == [3, 3]
    if "privacy" in aggregation:
        assert all(r["privacy"]["noise_stddev"] > 0 for r in history)


def test_a_timeout_that_passes_while_down_closes_the_round_on_restart(
    server: ServerProcess,
) -> None:
    aggregation = {"mode": "rounds", "clients_per_round": 5, "min_clients": 2, "round_timeout_s": 2}
    sid = httpx.post(server.url + "/v1/sessions", json=session_config(aggregation)).json()["id"]
    base = f"{server.url}/v1/sessions/{sid}"
    post_update(httpx, base + "/updates", 1, 1)
    post_update(httpx, base + "/updates", 2, 1)
    server.kill()
    time.sleep(2.2)
    server.start()
    base = f"{server.url}/v1/sessions/{sid}"
    polled = httpx.get(base + "/round/params", params={"after": 1, "wait": 10}, timeout=20)
    assert polled.status_code == 200, polled.text
    assert (polled.json()["round"], polled.json()["version"]) == (2, 1)
    record = httpx.get(base + "/rounds").json()["rounds"][0]
    assert record["closed_by"] == "timeout" and len(record["participants"]) == 2

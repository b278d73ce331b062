"""A step body is bounded by its session; bodies in flight share one budget."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest

from service.api.inflight import BodyBudget
from service.api.problems import Busy
from tests.api.conftest import SAFETENSORS, make_client, problem, st_body

SHAPE = (300, 3)
CONFIG = {
    "optimizer": {"name": "AdamW", "lr": 0.01},
    "params": {"layer.weight": {"shape": list(SHAPE)}},
}


def _values(seed: int, dtype: type = np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(dtype)


def test_the_largest_honest_step_bodies_fit_the_bound() -> None:
    with make_client() as client:
        sid = client.post("/v1/sessions", json=CONFIG).json()["id"]
        # Pretty-printed JSON of full-precision float64 text, gradients and params.
        document = {
            "grads": {"layer.weight": _values(1).tolist()},
            "params": {"layer.weight": _values(2).tolist()},
            "loss": 0.25,
        }
        text = json.dumps(document, indent=8).encode()
        response = client.post(
            f"/v1/sessions/{sid}/step", content=text, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 200, response.text
        # float64 safetensors of both, whatever the session's float32.
        body = st_body(
            {"layer.weight": _values(3), "params/layer.weight": _values(4)}, {"loss": "0.5"}
        )
        response = client.post(
            f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": SAFETENSORS}
        )
        assert response.status_code == 200, response.text


def _chunks(total: int, size: int = 16384) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"1" * size


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_step_body_past_what_its_session_can_need_is_413(declared: bool) -> None:
    with make_client() as client:
        sid = client.post("/v1/sessions", json=CONFIG).json()["id"]
        before = client.get(f"/v1/sessions/{sid}/state").content
        total = 8 << 20  # far below max_body_bytes, far above 900 numbers
        content: bytes | Iterator[bytes] = b"1" * total if declared else _chunks(total)
        response = client.post(
            f"/v1/sessions/{sid}/step",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        document = problem(response, 413, "body-too-large")
        assert document["limit"] == "step_body_bytes"
        assert document["maximum"] < 1 << 20
        assert response.headers["connection"] == "close"
        assert client.get(f"/v1/sessions/{sid}/state").content == before


def test_the_budget_waits_for_room_then_refuses() -> None:
    async def scenario() -> None:
        budget = BodyBudget(100, wait=0.2)
        await budget.take(80)
        waiting = asyncio.create_task(budget.take(50))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        budget.give(80)  # room comes within the wait
        await asyncio.wait_for(waiting, 1)
        assert budget.used == 50
        with pytest.raises(Busy) as busy:
            await budget.take(60)  # no room comes
        assert busy.value.retry_after == 1 and budget.used == 50
        budget.give(50)
        assert budget.used == 0

    asyncio.run(scenario())

"""The Python client's accumulation replies, step history records and CSV, on a live server."""

from __future__ import annotations

import asyncio
import csv
import io

import numpy as np
import pytest
from optserve_client import AsyncClient, Client


@pytest.mark.parametrize("wire", ["json", "safetensors"])
def test_accumulated_steps_metrics_and_history(live_url: str, wire: str) -> None:
    with Client(live_url, wire=wire) as client:  # type: ignore[arg-type]
        session = client.create_session(
            {"name": "SGD", "lr": 0.1, "momentum": 0.9},
            {"w": np.array([1.0, -2.0, 0.5])},
            schedule={"name": "StepLR", "step_size": 1, "gamma": 0.5},
            dtype="float64",
            accumulate={"steps": 2},
        )
        replies = [session.step({"w": np.full(3, float(n))}, loss=float(n)) for n in (1, 3, 2, 4)]
        assert [(r.applied, r.accumulated, r.of) for r in replies] == [
            (False, 1, 2),
            (True, 0, 2),
            (False, 1, 2),
            (True, 0, 2),
        ]
        assert replies[0].metrics is None and replies[0].deltas is None
        first = replies[1].metrics
        assert first is not None
        # The mean gradient of the first step is 2 in every element; its loss the mean, 2.
        assert first["grad_norm"] == pytest.approx(np.linalg.norm(np.full(3, 2.0)), rel=1e-12)
        assert first["loss"] == 2.0
        records = session.steps()
        assert [(r["step"], r["lr"], r["applied"]) for r in records] == [
            (1, [0.1], True),
            (2, [0.05], True),
        ]
        assert records[1]["metrics"] == replies[3].metrics
        rows = list(csv.DictReader(io.StringIO(session.steps_csv())))
        assert [row["step"] for row in rows] == ["1", "2"]
        assert float(rows[1]["lr0"]) == 0.05
        assert float(rows[0]["grad_norm"]) == first["grad_norm"]
        assert rows[0]["applied"] == "true" and rows[0]["skipped"] == ""


def test_the_async_client_reads_the_same_history(live_url: str) -> None:
    async def run() -> tuple[list[dict[str, object]], str]:
        async with AsyncClient(live_url) as client:
            session = await client.create_session(
                {"name": "Adam", "lr": 0.01}, {"w": (2,)}, dtype="float64"
            )
            for n in range(3):
                await session.step({"w": np.array([1.0 + n, 2.0])})
            return await session.steps(), await session.steps_csv()

    records, text = asyncio.run(run())
    assert [r["step"] for r in records] == [1, 2, 3]
    assert text.splitlines()[0] == (
        "seq,step,time,applied,skipped,lr0,grad_norm,update_norm,param_norm,loss"
    )
    assert len(text.splitlines()) == 4

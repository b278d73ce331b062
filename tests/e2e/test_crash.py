"""Crash test: SIGKILL a real server at random moments while a client streams steps.

A client sends steps with idempotency keys and retries each one until it is answered
(through connection errors while the server is down). Meanwhile the server is killed
with SIGKILL at random moments and started again on the same data directory, a bounded
number of times. Afterwards:

- every step was acknowledged exactly once, as the step number it was sent as (a retry
  of a step that was applied before the crash gets the stored reply, not a second step);
- the server's params equal the client's copy (initial values plus every delta it got)
  bit for bit, and equal a replay of the same gradients in torch (or, without torch, in
  a plain numpy transcription of torch's SGD).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.codec import safetensors
from tests.e2e.server_process import ServerProcess

pytestmark = pytest.mark.slow

SAFETENSORS = "application/vnd.optserve.safetensors"
Shapes = dict[str, tuple[int, ...]]
LARGE: Shapes = {"w": (200, 200), "b": (200,)}
"""320 KB of float64 per step: updated on a compute thread, appended beside it."""
SMALL: Shapes = {"w": (40, 25), "b": (25,)}
"""1k parameters: updated on the event loop, appended by asynchronous writes (into zeros
written ahead) where the kernel offers them."""
LR, MOMENTUM, WEIGHT_DECAY, DAMPENING = 0.01, 0.9, 1e-3, 0.1
KILLS = 4
MIN_STEPS = 60


def gradients(i: int, shapes: Shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def initial(shapes: Shapes) -> dict[str, np.ndarray]:
    return {k: v * 0.1 for k, v in gradients(10_000, shapes).items()}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with open(tmp_path / "server.log", "wb") as log:
        env = {"OPTSERVE_SNAPSHOT_EVERY": "7", "OPTSERVE_IDEMPOTENCY_WINDOW": "4"}
        running = ServerProcess(tmp_path / "data", log, env)
        running.start()
        try:
            yield running
        finally:
            running.stop()


def killer(server: ServerProcess, done: threading.Event, errors: list[BaseException]) -> None:
    rng = random.Random(1234)
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.05, 0.6))
            server.kill()
            server.start()
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)
    finally:
        done.set()


def send_step(
    client: httpx.Client, server: ServerProcess, sid: str, i: int, shapes: Shapes
) -> tuple[int, dict[str, np.ndarray], bool]:
    """POST step ``i`` until it is answered; retries keep its idempotency key."""
    body = safetensors.encode(gradients(i, shapes))
    headers = {"Content-Type": SAFETENSORS, "Accept": SAFETENSORS, "Idempotency-Key": f"step-{i}"}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = client.post(
                f"{server.url}/v1/sessions/{sid}/step", content=body, headers=headers
            )
        except httpx.TransportError:
            time.sleep(0.02)
            continue
        retry_later = response.status_code == 503 or (
            response.status_code == 409 and "step-in-flight" in response.text
        )
        if retry_later:
            time.sleep(0.02)
            continue
        assert response.status_code == 200, response.text
        deltas, metadata = safetensors.decode(response.content)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return int(metadata["step"]), deltas, replayed
    raise AssertionError(f"step {i} was never answered")


def numpy_sgd(count: int, shapes: Shapes) -> dict[str, np.ndarray]:
    """torch.optim.SGD's update rule (momentum, dampening, weight decay), transcribed."""
    params = initial(shapes)
    buffers: dict[str, np.ndarray] = {}
    for i in range(1, count + 1):
        for name, g in gradients(i, shapes).items():
            d = g + WEIGHT_DECAY * params[name]
            if name in buffers:
                buffers[name] = MOMENTUM * buffers[name] + (1 - DAMPENING) * d
            else:
                buffers[name] = d.copy()
            params[name] = params[name] - LR * buffers[name]
    return params


def torch_sgd(count: int, shapes: Shapes) -> dict[str, np.ndarray] | None:
    try:
        import torch
    except ImportError:
        return None
    tensors = {k: torch.tensor(v, dtype=torch.float64) for k, v in initial(shapes).items()}
    opt = torch.optim.SGD(
        list(tensors.values()),
        lr=LR,
        momentum=MOMENTUM,
        dampening=DAMPENING,
        weight_decay=WEIGHT_DECAY,
    )
    for i in range(1, count + 1):
        for name, g in gradients(i, shapes).items():
            tensors[name].grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize("shapes", [LARGE, SMALL], ids=["large", "small"])
def test_every_acknowledged_step_survives_sigkill_exactly_once(
    server: ServerProcess, shapes: Shapes
) -> None:
    config: dict[str, Any] = {
        "optimizer": {
            "name": "SGD",
            "lr": LR,
            "momentum": MOMENTUM,
            "dampening": DAMPENING,
            "weight_decay": WEIGHT_DECAY,
        },
        "params": {
            n: {"shape": list(s), "data": initial(shapes)[n].ravel().tolist()}
            for n, s in shapes.items()
        },
        "dtype": "float64",
    }
    created = httpx.post(server.url + "/v1/sessions", json=config, timeout=30)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]

    done = threading.Event()
    errors: list[BaseException] = []
    thread = threading.Thread(target=killer, args=(server, done, errors), daemon=True)
    client_params = initial(shapes)
    replays = 0
    i = 0
    with httpx.Client(timeout=10) as client:
        thread.start()
        while not done.is_set() or i < MIN_STEPS:
            i += 1
            step, deltas, replayed = send_step(client, server, sid, i, shapes)
            assert step == i, f"step {i} was acknowledged as step {step}"
            replays += replayed
            for name, delta in deltas.items():
                client_params[name] += delta
        thread.join()
    assert not errors, errors
    assert server.restarts == KILLS

    # One more crash after the last acknowledgement, then check what came back.
    server.kill()
    server.start()
    document = httpx.get(f"{server.url}/v1/sessions/{sid}", timeout=10).json()
    assert document["step"] == i
    held, _ = safetensors.decode(
        httpx.get(
            f"{server.url}/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS}, timeout=10
        ).content
    )
    for name in shapes:
        assert held[name].tobytes() == client_params[name].tobytes(), name
    reference = numpy_sgd(i, shapes)
    for name in shapes:
        np.testing.assert_allclose(held[name], reference[name], rtol=1e-12, atol=1e-14)
    replayed_by_torch = torch_sgd(i, shapes)
    if replayed_by_torch is not None:
        for name in shapes:
            np.testing.assert_allclose(held[name], replayed_by_torch[name], rtol=1e-10, atol=1e-12)
    starts = ", ".join(f"{s:.1f}" for s in server.start_seconds)
    print(f"{i} steps, {KILLS + 1} kills, {replays} replies replayed; starts took {starts} s")

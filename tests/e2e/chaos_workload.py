"""The chaos run's clients: sessions of float32 params stepped with deterministic gradients
(so the checker can replay them in torch), each step retried with its key until answered."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from service.codec import safetensors
from tests.e2e.chaos_plan import HarnessError, Plan

SAFETENSORS = "application/vnd.optserve.safetensors"
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


def initial_params(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng((seed, 0)).standard_normal(size, dtype=np.float32) * 0.1


def gradient(seed: int, index: int, size: int) -> np.ndarray:
    return np.random.default_rng((seed, index)).standard_normal(size, dtype=np.float32)


def session_config(size: int) -> dict[str, Any]:
    """An SGD session of one tensor ``w``; the initial values travel as safetensors."""
    return {
        "params": {"w": {"shape": [size]}},
        "optimizer": {"name": "SGD", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY},
        "dtype": "float32",
        "labels": {"harness": "chaos"},
    }


def torch_replay(seed: int, size: int, steps: int) -> np.ndarray:
    """The params after ``steps`` steps of torch.optim.SGD on the same gradients."""
    import torch

    weights = torch.tensor(initial_params(seed, size))
    optimizer = torch.optim.SGD([weights], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    for index in range(1, steps + 1):
        weights.grad = torch.from_numpy(gradient(seed, index, size))
        optimizer.step()
    return weights.numpy()


@dataclass(frozen=True)
class Ack:
    """One acknowledged step, as the client saw it."""

    index: int
    """the step the client sent (its key names it), 1-based."""
    step: int
    """the step number the server answered."""
    began: float
    ended: float
    attempts: int
    replayed: bool
    """answered from the idempotency record: a retry of a step already applied."""

    @property
    def seconds(self) -> float:
        return self.ended - self.began


@dataclass
class SessionLoad:
    sid: str
    size: int
    seed: int
    acks: list[Ack] = field(default_factory=list)

    def key(self, index: int) -> str:
        return f"{self.sid}/{index}"


def retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """Seconds before the next try: the server's Retry-After (capped at 1 s, a harness
    wants to see how soon a step gets through), else exponential from 20 ms to 0.5 s."""
    hinted = response.headers.get("retry-after") if response is not None else None
    if hinted is not None and hinted.isdigit():
        return min(float(hinted), 1.0)
    backoff: float = 0.02 * 2.0**attempt
    return min(backoff, 0.5)


def _problem_type(response: httpx.Response) -> str:
    try:
        document = response.json()
    except ValueError:
        return ""
    return str(document.get("type", "")) if isinstance(document, dict) else ""


def create_session(client: httpx.Client, url: str, seed: int, size: int) -> SessionLoad:
    """Create one session holding ``size`` float32 params (before the chaos starts)."""
    body = safetensors.encode(
        {"w": initial_params(seed, size)}, {"session": json.dumps(session_config(size))}
    )
    response = client.post(
        url + "/v1/sessions", content=body, headers={"Content-Type": SAFETENSORS}
    )
    if response.status_code != 201:
        raise HarnessError(f"creating a session: {response.status_code} {response.text}")
    return SessionLoad(response.json()["id"], size, seed)


def send_step(
    client: httpx.Client,
    url: str,
    load: SessionLoad,
    deadline_s: float,
    abort: threading.Event | None = None,
) -> Ack:
    """POST the session's next step until it is answered, always with the same key.

    A step is never given up while the run goes on: one the server applied and the client
    stopped asking about would look like a step applied twice. ``abort`` (the run failed
    elsewhere) is the exception."""
    index = len(load.acks) + 1
    body = safetensors.encode({"w": gradient(load.seed, index, load.size)})
    headers = {
        "Content-Type": SAFETENSORS,
        "Accept": "application/json",
        "Idempotency-Key": load.key(index),
    }
    target = f"{url}/v1/sessions/{load.sid}/step?return=none"
    began = time.monotonic()
    attempt = 0
    while time.monotonic() - began < deadline_s:
        if abort is not None and abort.is_set():
            raise HarnessError("aborted: the run failed elsewhere")
        attempt += 1
        response: httpx.Response | None = None
        try:
            response = client.post(target, content=body, headers=headers)
        except httpx.TransportError:
            time.sleep(retry_delay(attempt, None))
            continue
        status, kind = response.status_code, _problem_type(response)
        if status == 200:
            document = response.json()
            if document.get("applied") is not True:
                raise HarnessError(f"step {index} of {load.sid} not applied: {document}")
            replayed = response.headers.get("idempotent-replayed") == "true"
            return Ack(index, int(document["step"]), began, time.monotonic(), attempt, replayed)
        retry_later = (status in (502, 503, 504) and not kind.endswith("session-damaged")) or (
            status == 409 and kind.endswith("step-in-flight")
        )
        if not retry_later:
            raise HarnessError(f"step {index} of {load.sid}: {status} {response.text[:500]}")
        time.sleep(retry_delay(attempt, response))
    raise HarnessError(f"step {index} of {load.sid} not answered in {deadline_s} s")


def client_loop(
    url: str,
    loads: list[SessionLoad],
    plan: Plan,
    stop: threading.Event,
    abort: threading.Event,
    errors: list[BaseException],
) -> None:
    """Step each of ``loads`` in turn until ``stop``; the step in flight is finished."""
    try:
        with httpx.Client(timeout=httpx.Timeout(30, connect=2)) as client:
            while not stop.is_set():
                for load in loads:
                    ack = send_step(client, url, load, plan.step_deadline_s, abort)
                    load.acks.append(ack)
                    if stop.is_set():
                        break
    except BaseException as exc:  # reported by load_and_break()
        errors.append(exc)
        abort.set()
        stop.set()

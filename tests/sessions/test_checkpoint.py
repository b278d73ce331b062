"""Checkpoints: export, restore as a new session, continue bit for bit; damaged or
hostile checkpoints are refused with a checkpoint or core error, never anything else."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.codec import safetensors, strict_json
from service.core.errors import CoreError
from service.sessions import checkpoint
from service.sessions.errors import InvalidCheckpoint, SessionNotFound
from service.sessions.models import StepRecord, StepRequest
from service.sessions.service import SessionService
from service.sessions.store import MemoryStore
from tests.sessions.conftest import grads_for, running

pytestmark = pytest.mark.anyio

SHAPES = {"w": (3, 3), "b": (3,)}
PARAMS = {name: {"shape": list(shape)} for name, shape in SHAPES.items()}
CONFIGS: dict[str, dict[str, Any]] = {
    "adam-schedule": {
        "optimizer": {"name": "Adam", "lr": 0.1, "weight_decay": 0.01},
        "schedule": {"name": "OneCycleLR", "max_lr": 0.5, "total_steps": 40},
        "params": PARAMS,
    },
    "sgd-plateau": {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.5},
        "schedule": {"name": "ReduceLROnPlateau", "patience": 1, "interval": "manual"},
        "params": PARAMS,
        "dtype": "float64",
        "labels": {"kind": "plateau"},
    },
}


async def step(service: SessionService, sid: str, i: int, tenant: str = "t") -> None:
    await service.step(tenant, sid, StepRequest(grads=grads_for(SHAPES, i)))
    schedule = (await service.get(tenant, sid)).document()["schedule"]
    if i % 3 == 0 and schedule["interval"] == "manual":
        await service.schedule_step(tenant, sid, float(i % 2))


@pytest.mark.parametrize("name", list(CONFIGS))
async def test_a_restored_session_continues_in_lockstep(name: str) -> None:
    async with running(MemoryStore()) as service:
        original = (await service.create("t", CONFIGS[name], grads_for(SHAPES, 7))).id
        for i in range(5):
            await step(service, original, i)
        arrays, metadata = await service.export_state("t", original)
        assert service.is_checkpoint(metadata)
        # Through the wire format, as a client would post it back.
        decoded = safetensors.decode(safetensors.encode(arrays, metadata))
        restored = await service.restore("t2", *decoded)
        assert restored.id != original
        assert restored.step == 5
        assert restored.labels == CONFIGS[name].get("labels", {})
        for i in range(5, 12):
            await step(service, original, i)
            await step(service, restored.id, i, tenant="t2")
        a = await service.export_state("t", original)
        b = await service.export_state("t2", restored.id)
        assert a[0].keys() == b[0].keys()
        assert all(a[0][k].tobytes() == b[0][k].tobytes() for k in a[0])
        # The copy starts its own step history: the same steps, at its own events and times.
        history_a, history_b = json.loads(a[1].pop("steps")), json.loads(b[1].pop("steps"))
        assert a[1] == b[1]
        assert len(history_a) == 12 and len(history_b) == 7
        same = [(step, lr, applied, metrics) for _, step, _, lr, applied, _, metrics in history_a]
        assert same[5:] == [(s, lr, ap, m) for _, s, _, lr, ap, _, m in history_b]
        with pytest.raises(SessionNotFound):
            await service.get("t", restored.id)


async def test_a_checkpoint_mid_line_search_continues_exactly() -> None:
    cfg = {
        "optimizer": {"name": "LBFGS", "max_iter": 4, "line_search_fn": "strong_wolfe"},
        "params": {"x": {"shape": [3]}},
        "dtype": "float64",
    }

    def loss_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        return float(np.sum((x - 1.0) ** 4)), 4 * (x - 1.0) ** 3

    async def tell(service: SessionService, sid: str, tenant: str) -> np.ndarray:
        x = (await service.params(tenant, sid))["x"]
        loss, grad = loss_grad(x)
        reply = await service.step(tenant, sid, StepRequest(grads={"x": grad}, loss=loss))
        assert reply.tensors is not None
        return reply.tensors["x"]

    async with running(MemoryStore()) as service:
        sid = (await service.create("t", cfg, {"x": np.array([3.0, -2.0, 0.5])})).id
        for _ in range(3):
            await tell(service, sid, "t")
        restored = await service.restore("t", *(await service.export_state("t", sid)))
        for _ in range(10):
            a = await tell(service, sid, "t")
            b = await tell(service, restored.id, "t")
            assert a.tobytes() == b.tobytes()


async def good_checkpoint() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", CONFIGS["adam-schedule"], grads_for(SHAPES, 1))).id
        await step(service, sid, 1)
        return await service.export_state("t", sid)


def damaged(
    arrays: dict[str, np.ndarray], metadata: dict[str, str], how: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, metadata = dict(arrays), dict(metadata)
    state = json.loads(metadata["state"])
    if how == "no-format":
        del metadata["format"]
    elif how == "bad-json":
        metadata["session"] = "{not json"
    elif how == "bad-config":
        metadata["session"] = json.dumps({"optimizer": {"name": "Nope"}, "params": PARAMS})
    elif how == "extra-array":
        arrays["other"] = np.zeros(1, dtype=np.float32)
    elif how == "missing-state":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("state/")}
    elif how == "wrong-shape":
        name = next(k for k in arrays if k.startswith("state/"))
        arrays[name] = np.zeros(2, dtype=np.float32)
    elif how == "wrong-dtype":
        arrays["params/w"] = arrays["params/w"].astype(np.float64)
    elif how == "missing-params":
        del arrays["params/b"]
    elif how == "nan-params":
        arrays["params/w"] = np.full((3, 3), np.nan, dtype=np.float32)
    elif how == "groups":
        state["groups"] = []
        metadata["state"] = json.dumps(state)
    elif how == "labels":
        metadata["labels"] = json.dumps({"a": 1})
    elif how == "state-not-object":
        metadata["state"] = "[]"
    return arrays, metadata


@pytest.mark.parametrize(
    "how",
    [
        "no-format",
        "bad-json",
        "bad-config",
        "extra-array",
        "missing-state",
        "wrong-shape",
        "wrong-dtype",
        "missing-params",
        "nan-params",
        "groups",
        "labels",
        "state-not-object",
    ],
)
async def test_damaged_checkpoints_are_refused(how: str) -> None:
    arrays, metadata = damaged(*(await good_checkpoint()), how)
    async with running(MemoryStore()) as service:
        with pytest.raises((InvalidCheckpoint, CoreError)):
            await service.restore("t", arrays, metadata)
        assert (await service.list("t", 10, None))[0] == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["session", "state", "labels"]),
    path=st.lists(st.text(max_size=10), max_size=3),
    value=json_values,
)
def test_fuzzed_checkpoint_metadata_never_escapes_as_another_error(
    key: str, path: list[str], value: Any
) -> None:
    arrays, metadata = fuzz_base()
    document = json.loads(metadata[key])
    target = document
    for part in path[:-1]:
        if isinstance(target, dict) and target:
            target = target[sorted(target)[hash(part) % len(target)]]
    if isinstance(target, dict) and path:
        target[path[-1] if path[-1] not in target or not target else sorted(target)[0]] = value
    else:
        document = value
    changed = {**metadata, key: json.dumps(document)}
    with contextlib.suppress(InvalidCheckpoint, CoreError):
        checkpoint.restore(arrays, changed)


@functools.cache
def fuzz_base() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return asyncio.run(good_checkpoint())


def test_the_history_is_written_as_its_records_strict_json_made_once() -> None:
    records = [
        StepRecord(1, 1, 10.5, [0.1], True, None, {"grad_norm": 2.0}),
        StepRecord(2, 1, 11.0, [float("inf")], False, "nonfinite", None),
    ]
    text = "[" + ",".join(r.json_text for r in records) + "]"
    assert text == strict_json.dumps([r.to_json() for r in records])
    assert records[0].json_text is records[0].json_text  # made once, then kept
    assert [StepRecord.from_json(raw) for raw in json.loads(text)] == records

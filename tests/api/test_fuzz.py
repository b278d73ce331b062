"""Schemathesis against the app in-process: no request it can build may produce a 5xx, and
every answer must match the documented status codes, media types and schemas.

Operations on one session run half the time against a real session (created once), so
step bodies reach the decoders and the sessions layer rather than stopping at 404.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.config import Settings
from service.core import optimizers, schedules

# safetensors bodies are bytes on the wire, like application/octet-stream.
schemathesis.serializer.alias("application/vnd.optserve.safetensors", "application/octet-stream")

app = create_app(Settings(storage="memory", access_log=False, max_body_bytes=1 << 20))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "Adam", "lr": 0.01},
    "params": {"w": {"shape": [2], "data": [1.0, 2.0]}},
}


def _session_id() -> str:
    """A live session (the app's lifespan, and its sessions, end with each test)."""
    with asgi.get_client(app) as client:
        response = client.post(f"http://{asgi.HOST}/v1/sessions", json=CONFIG)
        assert response.status_code == 201, response.text
        session_id: str = response.json()["id"]
        return session_id


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_breaks_the_api(case: schemathesis.Case) -> None:
    if case.path_parameters and "session_id" in case.path_parameters and random.random() < 0.5:
        case.path_parameters["session_id"] = _session_id()
    case.call_and_validate(checks=CHECKS)


# -- hyperparameters ---------------------------------------------------------------------
# Every argument of every optimizer and schedule, given hostile values: integers too large
# for a float, huge and non-finite floats, bools, strings, nested lists, null, -0.0. The
# server may refuse (4xx) or accept; whatever it accepts must then step and preview
# without a 5xx either.

HUGE = 10**400
hostile_scalars = (
    st.sampled_from([HUGE, -HUGE, 2**63, -(2**63) - 1, 2**1024, -0.0, 0, None, True, False])
    | st.integers()
    | st.integers(min_value=-(10**320), max_value=10**320)
    | st.floats()
    | st.floats(min_value=-1e3, max_value=1e3)
    | st.text(max_size=4)
)
hostile_values = st.recursive(
    hostile_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
SCHEDULE_REQUIRED: dict[str, dict[str, Any]] = {
    "ChainedScheduler": {"schedulers": [{"name": "StepLR", "step_size": 2}]},
    "CosineAnnealingLR": {"T_max": 10},
    "CosineAnnealingWarmRestarts": {"T_0": 3},
    "CyclicLR": {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2},
    "ExponentialLR": {"gamma": 0.9},
    "MultiStepLR": {"milestones": [2, 4]},
    "OneCycleLR": {"max_lr": 0.1, "total_steps": 20},
    "SequentialLR": {
        "schedulers": [{"name": "ConstantLR"}, {"name": "StepLR", "step_size": 2}],
        "milestones": [3],
    },
    "StepLR": {"step_size": 2},
}
HOLDING = {"w": {"shape": [2, 2], "data": [[1.0, -2.0], [0.5, 3.0]]}}
JSON_BODY = {"Content-Type": "application/json"}
FUZZ_CLIENT_SETTINGS = Settings(storage="memory", access_log=False, log_level="error")


def _hostile_args(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), hostile_values, min_size=1, max_size=3)


def _no_server_error(response: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/problem+json"


def _post(client: TestClient, path: str, document: Any) -> Any:
    # Python's JSON, NaN and Infinity literals included: the server must refuse those too.
    return client.post(path, content=json.dumps(document), headers=JSON_BODY)


def _exercise(client: TestClient, config: dict[str, Any]) -> None:
    """Create a session from ``config``; if it is accepted, step it and preview it."""
    created = _post(client, "/v1/sessions", config)
    _no_server_error(created)
    preview = {k: config[k] for k in ("optimizer", "schedule") if k in config}
    _no_server_error(_post(client, "/v1/schedules/preview", {**preview, "steps": 40}))
    if created.status_code != 201:
        return
    sid = created.json()["id"]
    for scale in (1.0, 1e30, 1e-30):
        grads = [[scale, -scale], [2 * scale, 0.0]]
        _no_server_error(client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": grads}}))
    _no_server_error(_post(client, f"/v1/sessions/{sid}/schedule/step", {"metric": HUGE}))
    _no_server_error(client.get(f"/v1/sessions/{sid}"))
    _no_server_error(client.get(f"/v1/sessions/{sid}/state"))
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[TestClient]:
    with TestClient(create_app(FUZZ_CLIENT_SETTINGS), raise_server_exceptions=False) as client:
        yield client


# numpy's overflow warnings are errors under pytest but not in a server, where an inf
# or NaN update is what torch computes too.
NUMPY_WARNINGS_AS_IN_A_SERVER = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@NUMPY_WARNINGS_AS_IN_A_SERVER
@pytest.mark.parametrize("name", [o.name for o in optimizers.all_optimizers()])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_optimizer_arguments_never_5xx(
    fuzz_client: TestClient, name: str, data: st.DataObject
) -> None:
    optimizer = optimizers.get(name)
    args = data.draw(_hostile_args([a.name for a in optimizer.args]))
    _exercise(fuzz_client, {"optimizer": {"name": name, **args}, "params": HOLDING})


@NUMPY_WARNINGS_AS_IN_A_SERVER
@pytest.mark.parametrize("name", [s.name for s in schedules.all_schedules()])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_hostile_schedule_arguments_never_5xx(
    fuzz_client: TestClient, name: str, data: st.DataObject
) -> None:
    schedule = schedules.get(name)
    names = [a.name for a in schedule.args] + ["interval", "every"]
    args = data.draw(_hostile_args(names))
    config = {"name": name, **SCHEDULE_REQUIRED.get(name, {}), **args}
    optimizer = {"name": "SGD", "lr": 0.1, "momentum": 0.9}
    _exercise(fuzz_client, {"optimizer": optimizer, "schedule": config, "params": HOLDING})

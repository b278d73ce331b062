"""Bad input of every kind gets a 4xx problem and leaves the exported state byte for byte."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, grads, make_client, problem, st_body

LIMIT = 64 * 1024
CONFIG: dict[str, Any] = {
    "optimizer": {"name": "AdamW", "lr": 0.01, "weight_decay": 0.1},
    "schedule": {"name": "StepLR", "step_size": 2, "gamma": 0.5},
    "params": {
        "w": {"shape": [2, 3], "data": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]},
        "b": {"shape": [3], "data": [1.0, 2.0, 3.0]},
    },
    "clip_grad_norm": {"max_norm": 1.0},
    "nonfinite": "error",
}
JSON = {"Content-Type": "application/json"}
ST = {"Content-Type": SAFETENSORS}


@pytest.fixture(scope="module")
def primed() -> Iterator[tuple[TestClient, str]]:
    """A parameter-holding session that has taken a few good steps."""
    with make_client(max_body_bytes=LIMIT, idempotency_window=4) as client:
        sid = client.post("/v1/sessions", json=CONFIG).json()["id"]
        for seed in range(3):
            response = client.post(
                f"/v1/sessions/{sid}/step",
                content=st_body(grads(seed)),
                headers={**ST, "Idempotency-Key": f"good-{seed}"},
            )
            assert response.status_code == 200
        yield client, sid


def _state(client: TestClient, sid: str) -> bytes:
    response = client.get(f"/v1/sessions/{sid}/state")
    assert response.status_code == 200
    return response.content


def _good_json(seed: int = 0) -> dict[str, Any]:
    return {"grads": {n: v.tolist() for n, v in grads(seed).items()}}


def _nan_grads() -> dict[str, np.ndarray]:
    g = grads()
    g["w"][0, 1] = np.nan
    return g


def _bad_requests() -> list[tuple[str, dict[str, Any]]]:
    good = st_body(grads())
    good_grads = _good_json()["grads"]
    nan_json = b'{"grads": {"w": [NaN,1,1,1,1,1], "b": [1,1,1]}}'
    nan_loss = b'{"grads": {"w": [1,1,1,1,1,1], "b": [1,1,1]}, "loss": NaN}'
    ints = st_body({"w": np.ones((2, 3), np.int8), "b": np.ones(3, bool)})
    huge = st_body({"w": np.zeros((2, 3), np.float32), "b": np.zeros(LIMIT, np.float32)})
    return [
        ("wrong shape", {"json": {"grads": {"w": [1.0] * 5, "b": [1.0] * 3}}}),
        ("missing tensor", {"json": {"grads": {"w": [1.0] * 6}}}),
        ("unknown tensor", {"json": {"grads": {**good_grads, "z": [1.0]}}}),
        ("strings", {"json": {"grads": {"w": ["a"] * 6, "b": [1.0] * 3}}}),
        ("nan json", {"content": nan_json, "headers": JSON}),
        ("inf safetensors", {"content": st_body(_nan_grads()), "headers": ST}),
        ("nan loss", {"content": nan_loss, "headers": JSON}),
        ("truncated safetensors", {"content": good[: len(good) // 2], "headers": ST}),
        ("garbage safetensors", {"content": b"\x00" * 64, "headers": ST}),
        ("header lies", {"content": (10**6).to_bytes(8, "little") + good[8:], "headers": ST}),
        ("malformed json", {"content": b'{"grads": {', "headers": JSON}),
        ("wrong content type", {"content": good, "headers": {"Content-Type": "text/plain"}}),
        ("oversized body", {"content": huge, "headers": ST}),
        ("params to a holding session", {"json": {"grads": good_grads, "params": good_grads}}),
        ("stale If-Match", {"json": _good_json(), "headers": {"If-Match": '"0"'}}),
        ("malformed If-Match", {"json": _good_json(), "headers": {"If-Match": "zero"}}),
        ("bad return", {"json": _good_json(), "params": {"return": "all"}}),
        ("key reused", {"json": _good_json(7), "headers": {"Idempotency-Key": "good-2"}}),
        ("expired key", {"json": _good_json(0), "headers": {"Idempotency-Key": "good-0"}}),
        ("unacceptable Accept", {"json": _good_json(), "headers": {"Accept": "text/csv"}}),
        ("integer safetensors", {"content": ints, "headers": ST}),
    ]  # fmt: skip


BAD = _bad_requests()


@pytest.mark.parametrize(("case", "request_args"), BAD, ids=[case for case, _ in BAD])
def test_bad_step_input_changes_nothing(
    primed: tuple[TestClient, str], case: str, request_args: dict[str, Any]
) -> None:
    client, sid = primed
    before = _state(client, sid)
    response = client.post(f"/v1/sessions/{sid}/step", **request_args)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    assert _state(client, sid) == before, case


def test_key_replay_changes_nothing(primed: tuple[TestClient, str]) -> None:
    client, sid = primed
    before = _state(client, sid)
    replay = client.post(
        f"/v1/sessions/{sid}/step",
        content=st_body(grads(2)),
        headers={**ST, "Idempotency-Key": "good-2"},
    )
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert _state(client, sid) == before


def test_bad_schedule_step_changes_nothing(primed: tuple[TestClient, str]) -> None:
    client, sid = primed
    before = _state(client, sid)
    assert client.post(f"/v1/sessions/{sid}/schedule/step", json={"metric": 1.0}).status_code == 422
    assert (
        client.post(f"/v1/sessions/{sid}/schedule/step", content=b"{", headers=JSON).status_code
        == 400
    )
    assert _state(client, sid) == before


def _mutations() -> st.SearchStrategy[bytes]:
    base = st_body(grads(), {"loss": "0.5"})
    mutate = st.lists(
        st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=6
    )

    def apply(edits: list[tuple[int, int]]) -> bytes:
        data = bytearray(base)
        for at, value in edits:
            data[at] = value
        return bytes(data)

    return mutate.map(apply) | st.binary(max_size=200)


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=7)
        | st.dictionaries(st.sampled_from(["w", "b", "x"]), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        _mutations().map(lambda b: (b, SAFETENSORS)),
        st.fixed_dictionaries(
            {"grads": json_values}, optional={"loss": json_values, "params": json_values}
        ).map(lambda d: (json.dumps(d).encode(), "application/json")),
    )
)
def test_fuzzed_steps_are_4xx_and_change_nothing_or_2xx(
    primed: tuple[TestClient, str], body: tuple[bytes, str]
) -> None:
    client, sid = primed
    before = _state(client, sid)
    content, content_type = body
    response = client.post(
        f"/v1/sessions/{sid}/step", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert _state(client, sid) == before
    else:
        assert (
            safetensors.decode(response.content) if content_type == SAFETENSORS else response.json()
        )


# -- numbers that do not fit -------------------------------------------------------------

TOO_BIG = "1" + "0" * 400
"""A JSON integer beyond the float range (Python's json reads it as an exact int)."""


SGD = '{"name": "SGD", "lr": 0.1}'


def _config_text(optimizer: str = SGD, extra: str = "", shape: Any = (2,)) -> str:
    params = json.dumps({"w": {"shape": list(shape)}})
    return f'{{"optimizer": {optimizer}, "params": {params}{extra}}}'


def _schedule_text(schedule: str) -> str:
    return _config_text(extra=f', "schedule": {schedule}')


OVERSIZED_NUMBERS = [
    ("optimizer.lr", _config_text(f'{{"name": "SGD", "lr": {TOO_BIG}}}')),
    ("optimizer.momentum", _config_text(f'{{"name": "SGD", "lr": 0.1, "momentum": {TOO_BIG}}}')),
    ("optimizer.betas", _config_text(f'{{"name": "Adam", "betas": [0.9, {TOO_BIG}]}}')),
    ("optimizer.eps[1]", _config_text(f'{{"name": "Adafactor", "eps": [null, {TOO_BIG}]}}')),
    ("optimizer.eps[0]", _config_text(f'{{"name": "Adafactor", "eps": [{TOO_BIG}, 0.001]}}')),
    ("schedule.gamma", _schedule_text(f'{{"name": "ExponentialLR", "gamma": {TOO_BIG}}}')),
    ("schedule.T_max", _schedule_text(f'{{"name": "CosineAnnealingLR", "T_max": {TOO_BIG}}}')),
    (
        "schedule.max_lr",
        _schedule_text(f'{{"name": "OneCycleLR", "max_lr": [{TOO_BIG}], "total_steps": 9}}'),
    ),
    (
        "clip_grad_norm.max_norm",
        _config_text(extra=f', "clip_grad_norm": {{"max_norm": {TOO_BIG}}}'),
    ),
    ("clip_grad_value.clip_value", _config_text(extra=f', "clip_grad_value": {TOO_BIG}')),
    ("params.w.shape", _config_text(shape=[1] * 65)),
    ("params.w.shape", _config_text(shape=[2**62, 2**62, 0])),
    ("params.w.shape", _config_text(shape=[2**70, 0])),
]


@pytest.mark.parametrize(
    ("field", "body"), OVERSIZED_NUMBERS, ids=[f for f, _ in OVERSIZED_NUMBERS]
)
def test_numbers_too_large_for_their_type_are_refused_by_field(field: str, body: str) -> None:
    with make_client() as client:
        response = client.post("/v1/sessions", content=body, headers=JSON)
        document = problem(response, 422, "invalid-hyperparameter")
        assert [e["field"] for e in document["errors"]] == [field]
        assert field in document["detail"]
        assert client.get("/v1/sessions").json()["sessions"] == []


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("optimizer.lr", f'{{"optimizer": {{"name": "SGD", "lr": {TOO_BIG}}}, "steps": 3}}'),
        (
            "schedule.gamma",
            f'{{"optimizer": {{"name": "SGD", "lr": 0.1}}, "steps": 3, '
            f'"schedule": {{"name": "ExponentialLR", "gamma": {TOO_BIG}}}}}',
        ),
        (
            "metrics",
            f'{{"optimizer": {{"name": "SGD", "lr": 0.1}}, "steps": 2, '
            f'"schedule": {{"name": "ReduceLROnPlateau"}}, "metrics": [{TOO_BIG}, 1]}}',
        ),
    ],
)
def test_preview_refuses_numbers_too_large(field: str, body: str) -> None:
    with make_client() as client:
        response = client.post("/v1/schedules/preview", content=body, headers=JSON)
        document = problem(response, 422)
        assert [e["field"] for e in document["errors"]] == [field]


def test_a_metric_too_large_for_a_float_is_refused() -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "schedule": {"name": "ReduceLROnPlateau", "interval": "manual"},
        "params": {"w": {"shape": [2]}},
    }
    with make_client() as client:
        sid = client.post("/v1/sessions", json=config).json()["id"]
        before = _state(client, sid)
        response = client.post(
            f"/v1/sessions/{sid}/schedule/step", content=f'{{"metric": {TOO_BIG}}}', headers=JSON
        )
        assert problem(response, 422)["errors"][0]["field"] == "metric"
        assert _state(client, sid) == before


def _safetensors_with_shape(shape: list[int], nbytes: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}})
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * nbytes


@pytest.mark.parametrize(
    ("shape", "nbytes"), [([1] * 65, 4), ([2**62, 2**62, 0], 0), ([2**63, 0], 0)]
)
def test_safetensors_shapes_numpy_cannot_hold_are_malformed(
    primed: tuple[TestClient, str], shape: list[int], nbytes: int
) -> None:
    client, sid = primed
    before = _state(client, sid)
    body = _safetensors_with_shape(shape, nbytes)
    response = client.post(f"/v1/sessions/{sid}/step", content=body, headers=ST)
    assert problem(response, 400, "malformed-body")["errors"][0]["field"] == "w"
    created = client.post("/v1/sessions", content=body, headers=ST)
    assert problem(created, 400, "malformed-body")["errors"][0]["field"] == "w"
    assert _state(client, sid) == before


def test_a_gradient_beyond_the_sessions_dtype_is_refused_as_nonfinite(
    primed: tuple[TestClient, str],
) -> None:
    client, sid = primed
    before = _state(client, sid)
    wide = {name: values.astype(np.float64) for name, values in grads().items()}
    wide["w"][1, 2] = 1e39  # finite as sent, Inf once cast to the session's float32
    response = client.post(f"/v1/sessions/{sid}/step", content=st_body(wide), headers=ST)
    assert "NaN or Inf" in problem(response, 422)["detail"]
    assert _state(client, sid) == before

"""POST /v1/sessions/{id}/step: both wire formats, return modes, idempotency, If-Match."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, adam_config, grads, problem, st_body, st_headers
from tests.api.reference import InProcess

Create = Callable[..., dict[str, Any]]


def _json_grads(g: dict[str, np.ndarray]) -> dict[str, Any]:
    return {name: values.tolist() for name, values in g.items()}


def _arrays(document: dict[str, Any], key: str = "deltas") -> dict[str, np.ndarray]:
    return {n: np.asarray(v, dtype=np.float32) for n, v in document[key].items()}


def test_json_steps_match_core_bit_for_bit(client: TestClient, create: Create) -> None:
    session = create()
    reference = InProcess(adam_config())
    for seed in range(5):
        g = grads(seed)
        response = client.post(f"/v1/sessions/{session['id']}/step", json={"grads": _json_grads(g)})
        assert response.status_code == 200, response.text
        assert response.headers["etag"] == f'"{seed + 1}"'
        body = response.json()
        assert body["step"] == seed + 1 and body["applied"] is True and body["lr"] == [0.01]
        expected = reference.step(g)
        for name, delta in _arrays(body).items():
            assert delta.shape == expected[name].shape
            np.testing.assert_array_equal(delta, expected[name])


def test_safetensors_steps_match_core_bit_for_bit(client: TestClient, create: Create) -> None:
    session = create()
    reference = InProcess(adam_config())
    for seed in range(3):
        g = grads(seed)
        response = client.post(
            f"/v1/sessions/{session['id']}/step", content=st_body(g), headers=st_headers()
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == SAFETENSORS
        tensors, metadata = safetensors.decode(response.content)
        metrics = json.loads(metadata.pop("metrics"))
        assert metadata == {"step": str(seed + 1), "lr": "[0.01]", "applied": "true"}
        assert set(metrics) == {"grad_norm", "update_norm"}
        expected = reference.step(g)
        for name in expected:
            np.testing.assert_array_equal(tensors[name], expected[name])


def test_response_type_defaults_to_request_type_and_follows_accept(
    client: TestClient, create: Create
) -> None:
    sid = create()["id"]
    body = st_body(grads())
    as_request = client.post(
        f"/v1/sessions/{sid}/step", content=body, headers={"Content-Type": SAFETENSORS}
    )
    assert as_request.headers["content-type"] == SAFETENSORS
    as_json = client.post(
        f"/v1/sessions/{sid}/step",
        content=body,
        headers={"Content-Type": "application/octet-stream", "Accept": "application/json"},
    )
    assert as_json.headers["content-type"] == "application/json"
    assert set(as_json.json()["deltas"]) == {"w", "b"}
    json_in_st_out = client.post(
        f"/v1/sessions/{sid}/step",
        json={"grads": _json_grads(grads())},
        headers={"Accept": SAFETENSORS},
    )
    assert json_in_st_out.headers["content-type"] == SAFETENSORS


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_other_float_dtypes_are_cast_to_the_session_dtype(
    client: TestClient, create: Create, dtype: str
) -> None:
    sid = create()["id"]
    g = {"w": np.full((2, 3), 0.5, np.float32), "b": np.full(3, -2.0, np.float32)}
    if dtype == "BF16":
        body = _bf16_body({n: (v.view(np.uint32) >> 16).astype("<u2") for n, v in g.items()})
    else:
        body = st_body(
            {n: v.astype({"F16": np.float16, "F64": np.float64}[dtype]) for n, v in g.items()}
        )
    response = client.post(f"/v1/sessions/{sid}/step", content=body, headers=st_headers())
    assert response.status_code == 200, response.text
    deltas, _ = safetensors.decode(response.content)
    expected = InProcess(adam_config()).step(g)
    for name in g:
        assert deltas[name].dtype == np.float32
        np.testing.assert_array_equal(deltas[name], expected[name])


def _bf16_body(bits: dict[str, np.ndarray]) -> bytes:
    header: dict[str, Any] = {}
    offset = 0
    for name, values in bits.items():
        header[name] = {
            "dtype": "BF16",
            "shape": list(values.shape),
            "data_offsets": [offset, offset + values.nbytes],
        }
        offset += values.nbytes
    text = json.dumps(header).encode()
    data = b"".join(values.tobytes() for values in bits.values())
    return len(text).to_bytes(8, "little") + text + data


def test_bare_grads_list_for_a_one_tensor_session(client: TestClient, create: Create) -> None:
    config = {"optimizer": {"name": "SGD", "lr": 0.5}, "params": {"x": {"shape": [2, 2]}}}
    sid = create(config)["id"]
    response = client.post(f"/v1/sessions/{sid}/step", json={"grads": [1, 2, 3, 4]})
    assert response.status_code == 200, response.text
    assert response.json()["deltas"]["x"] == [[-0.5, -1.0], [-1.5, -2.0]]
    two = create()["id"]
    problem(client.post(f"/v1/sessions/{two}/step", json={"grads": [1.0] * 9}), 422)


def test_flat_lists_are_accepted_for_any_shape(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    g = grads()
    flat = {name: values.reshape(-1).tolist() for name, values in g.items()}
    response = client.post(f"/v1/sessions/{sid}/step", json={"grads": flat})
    assert response.status_code == 200, response.text
    expected = InProcess(adam_config()).step(g)
    np.testing.assert_array_equal(_arrays(response.json())["w"], expected["w"])


def test_return_modes(client: TestClient, create: Create) -> None:
    config = adam_config(optimizer={"name": "SGD", "lr": 0.1})
    config["params"] = {"w": {"shape": [2], "data": [1.0, 2.0]}}
    sid = create(config)["id"]
    url = f"/v1/sessions/{sid}/step"
    delta = client.post(url, json={"grads": {"w": [1.0, 1.0]}}).json()
    assert delta["deltas"]["w"] == pytest.approx([-0.1, -0.1])
    new = client.post(url, params={"return": "params"}, json={"grads": {"w": [1.0, 1.0]}})
    assert new.json()["params"]["w"] == pytest.approx([0.8, 1.8])
    none = client.post(url, params={"return": "none"}, json={"grads": {"w": [1.0, 1.0]}}).json()
    assert none["step"] == 3 and "deltas" not in none and "params" not in none
    held = client.get(f"/v1/sessions/{sid}/params").json()
    assert held["step"] == 3
    assert held["params"]["w"] == pytest.approx([0.7, 1.7])
    bad = client.post(url, params={"return": "everything"}, json={"grads": {"w": [1.0, 1.0]}})
    assert problem(bad, 422)["errors"][0]["field"] == "return"


def test_params_sent_by_the_client_for_weight_decay(client: TestClient, create: Create) -> None:
    config = adam_config(optimizer={"name": "AdamW", "lr": 0.01, "weight_decay": 0.1})
    sid = create(config)["id"]
    g = grads(1)
    p = grads(2)
    missing = client.post(f"/v1/sessions/{sid}/step", json={"grads": _json_grads(g)})
    problem(missing, 422, "params-required")
    response = client.post(
        f"/v1/sessions/{sid}/step", json={"grads": _json_grads(g), "params": _json_grads(p)}
    )
    assert response.status_code == 200, response.text
    expected = InProcess(config).step(g, p)
    np.testing.assert_array_equal(_arrays(response.json())["w"], expected["w"])
    tensors = {**g, **{f"params/{n}": v for n, v in p.items()}}
    via_st = client.post(f"/v1/sessions/{sid}/step", content=st_body(tensors), headers=st_headers())
    assert via_st.status_code == 200, via_st.text


def test_returning_params_without_params_is_refused(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    response = client.post(
        f"/v1/sessions/{sid}/step",
        params={"return": "params"},
        json={"grads": _json_grads(grads())},
    )
    assert response.status_code == 422, response.text


def test_idempotency_key_replays_without_applying_again(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    url = f"/v1/sessions/{sid}/step"
    body = {"grads": _json_grads(grads())}
    first = client.post(url, json=body, headers={"Idempotency-Key": "k1"})
    again = client.post(url, json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 1
    other = client.post(
        url, json={"grads": _json_grads(grads(9))}, headers={"Idempotency-Key": "k1"}
    )
    problem(other, 422, "idempotency-key-reused")
    # The same body asking for another return mode is another request too.
    mode = client.post(url, params={"return": "none"}, json=body, headers={"Idempotency-Key": "k1"})
    problem(mode, 422, "idempotency-key-reused")
    # A replay may be answered in another format: the stored reply is data, not bytes.
    as_st = client.post(url, json=body, headers={"Idempotency-Key": "k1", "Accept": SAFETENSORS})
    tensors, metadata = safetensors.decode(as_st.content)
    assert metadata["step"] == "1"
    np.testing.assert_array_equal(tensors["w"], np.asarray(first.json()["deltas"]["w"], np.float32))


def test_old_idempotency_key_is_refused_with_the_step_it_was_applied_at() -> None:
    from tests.api.conftest import make_client

    with make_client(idempotency_window=2) as client:
        sid = client.post("/v1/sessions", json=adam_config()).json()["id"]
        url = f"/v1/sessions/{sid}/step"
        body = {"grads": _json_grads(grads())}
        for n in range(4):
            assert (
                client.post(url, json=body, headers={"Idempotency-Key": f"k{n}"}).status_code == 200
            )
        expired = problem(
            client.post(url, json=body, headers={"Idempotency-Key": "k0"}),
            409,
            "idempotency-expired",
        )
        assert expired["applied_at_step"] == 1
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 4


@pytest.mark.parametrize("key", [b"", b"x" * 256, b"with space", "ünïcode".encode()])
def test_malformed_idempotency_keys_are_refused(
    client: TestClient, create: Create, key: bytes
) -> None:
    sid = create()["id"]
    response = client.post(
        f"/v1/sessions/{sid}/step",
        json={"grads": _json_grads(grads())},
        headers={b"Idempotency-Key": key},
    )
    assert response.status_code in (400, 422), response.text
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_if_match(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    url = f"/v1/sessions/{sid}/step"
    body = {"grads": _json_grads(grads())}
    assert client.post(url, json=body, headers={"If-Match": '"0"'}).status_code == 200
    stale = client.post(url, json=body, headers={"If-Match": '"0"'})
    document = problem(stale, 412, "precondition-failed")
    assert stale.headers["etag"] == '"1"' and document["etag"] == '"1"'
    assert client.post(url, json=body, headers={"If-Match": 'W/"1"'}).status_code == 200
    assert client.post(url, json=body, headers={"If-Match": "*"}).status_code == 200
    problem(client.post(url, json=body, headers={"If-Match": "3"}), 400)
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 3


def test_nonfinite_grads_error_or_skip(client: TestClient, create: Create) -> None:
    sid = create()["id"]
    bad = grads()
    bad["b"][1] = np.inf
    refused = client.post(f"/v1/sessions/{sid}/step", content=st_body(bad), headers=st_headers())
    assert problem(refused, 422)["errors"][0]["field"] == "grads.b"
    skipper = create(adam_config(nonfinite="skip"))["id"]
    skipped = client.post(
        f"/v1/sessions/{skipper}/step", content=st_body(bad), headers=st_headers()
    )
    assert skipped.status_code == 200
    _, metadata = safetensors.decode(skipped.content)
    assert metadata["applied"] == "false" and "skipped" in metadata
    document = client.get(f"/v1/sessions/{skipper}").json()
    assert document["skipped_steps"] == 1 and document["step"] == 0
    as_json = client.post(
        f"/v1/sessions/{skipper}/step",
        content=b'{"grads": {"w": [[NaN, 0, 0], [0, 0, 0]], "b": [0, 0, 0]}}',
        headers={"Content-Type": "application/json"},
    ).json()
    assert as_json["applied"] is False and as_json["skipped"]


def test_loss_travels_in_json_and_in_safetensors_metadata(
    client: TestClient, create: Create
) -> None:
    config = {
        "optimizer": {"name": "SGD", "lr": 1.0},
        "schedule": {"name": "ReduceLROnPlateau", "patience": 0, "factor": 0.5},
        "params": {"x": {"shape": [1]}},
    }
    sid = create(config)["id"]
    url = f"/v1/sessions/{sid}/step"
    assert client.post(url, json={"grads": [1.0]}).status_code == 422  # the schedule needs it
    assert client.post(url, json={"grads": [1.0], "loss": 1.0}).json()["lr"] == [1.0]
    body = st_body({"x": np.ones(1, np.float32)}, {"loss": "2.0"})
    response = client.post(url, content=body, headers=st_headers())
    assert safetensors.decode(response.content)[1]["lr"] == "[0.5]"
    bad = st_body({"x": np.ones(1, np.float32)}, {"loss": "lots"})
    assert (
        problem(client.post(url, content=bad, headers=st_headers()), 422)["errors"][0]["field"]
        == "loss"
    )


def test_lbfgs_ask_tell_over_http(client: TestClient, create: Create) -> None:
    config = {
        "optimizer": {"name": "LBFGS", "lr": 1.0, "max_iter": 5, "line_search_fn": "strong_wolfe"},
        "params": {"x": {"shape": [2], "data": [-1.5, 2.0]}},
        "dtype": "float64",
    }
    sid = create(config)["id"]

    def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = x
        loss = (1 - a) ** 2 + 100 * (b - a * a) ** 2
        grad = np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])
        return float(loss), grad

    x = np.array([-1.5, 2.0])
    asked = 0
    step = 0
    while step < 3 and asked < 100:
        loss, g = rosenbrock(x)
        response = client.post(
            f"/v1/sessions/{sid}/step",
            params={"return": "params"},
            json={"grads": {"x": g.tolist()}, "loss": loss},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        x = np.asarray(body["params"]["x"])
        step = body["step"]
        asked += 1
        if body.get("evaluate"):
            assert response.json()["evaluate"] is True
    assert step == 3 and asked > 3  # several closure calls per step
    assert rosenbrock(x)[0] < rosenbrock(np.array([-1.5, 2.0]))[0]


def test_step_on_unknown_session_is_404(client: TestClient) -> None:
    problem(client.post("/v1/sessions/nope/step", json={"grads": {}}), 404, "session-not-found")


@pytest.mark.parametrize("wire", ["json", "safetensors"])
def test_large_payloads_take_the_worker_thread_path_with_the_same_numbers(
    client: TestClient, create: Create, wire: str
) -> None:
    from service.api.offload import OFFLOAD_BYTES

    size = OFFLOAD_BYTES // 4 + 1000
    config = {"optimizer": {"name": "Adam", "lr": 0.01}, "params": {"v": {"shape": [size]}}}
    sid = create(config)["id"]
    g = {"v": np.random.default_rng(3).standard_normal(size).astype(np.float32)}
    if wire == "json":
        response = client.post(f"/v1/sessions/{sid}/step", json={"grads": {"v": g["v"].tolist()}})
        delta = np.asarray(response.json()["deltas"]["v"], dtype=np.float32)
    else:
        response = client.post(f"/v1/sessions/{sid}/step", content=st_body(g), headers=st_headers())
        delta = safetensors.decode(response.content)[0]["v"]
    assert response.status_code == 200
    np.testing.assert_array_equal(delta, InProcess(config).step(g)["v"])

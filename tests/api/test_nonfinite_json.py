"""Non-finite numbers in JSON: ``"inf"``, ``"-inf"`` and ``"nan"`` out, names or tokens in.

Every response of every API test already goes through a strict parser (conftest's
``StrictJSONClient``); these tests drive the places where a value is genuinely not finite
(an infinite clipping norm, an infinite lr, an update that overflows) and check what is
written, and that the strings are read back wherever torch takes ``float("inf")``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS, check_strict_body, problem, strict_json
from tests.api.reference import InProcess

JSON = {"Content-Type": "application/json"}
PARAMS = {"w": {"shape": [2, 3]}, "b": {"shape": [3]}}
GRADS = {"w": [[0.5, -3.0, 1.0], [2.0, 0.25, -1.5]], "b": [4.0, -0.5, 1.0]}


def config(**extra: Any) -> dict[str, Any]:
    return {"optimizer": {"name": "SGD", "lr": 0.1}, "params": PARAMS, "dtype": "float64", **extra}


@pytest.mark.parametrize(
    "body",
    [
        b'{"max_norm": 1.0, "norm_type": Infinity}',
        b'{"max_norm": 1.0, "norm_type": "inf"}',
        b'{"max_norm": 1.0, "norm_type": "Infinity"}',
        b'{"max_norm": 1.0, "norm_type": "INF"}',
        b'{"max_norm": 1.0, "norm_type": "+inf"}',
    ],
    ids=["token", "inf", "Infinity", "INF", "+inf"],
)
def test_an_infinite_norm_type_is_accepted_and_written_inf(client: TestClient, body: bytes) -> None:
    text = (
        b'{"optimizer": {"name": "SGD", "lr": 0.1}, "dtype": "float64", '
        b'"params": {"w": {"shape": [2, 3]}, "b": {"shape": [3]}}, "clip_grad_norm": ' + body + b"}"
    )
    created = client.post("/v1/sessions", content=text, headers=JSON)
    assert created.status_code == 201, created.text
    document = created.json()
    assert document["clip_grad_norm"] == {"max_norm": 1.0, "norm_type": "inf"}
    assert client.get(f"/v1/sessions/{document['id']}").json() == document
    # The max norm clips as torch's clip_grad_norm_(..., norm_type=inf) does.
    reference = InProcess(config(clip_grad_norm={"max_norm": 1.0, "norm_type": math.inf}))
    step = client.post(f"/v1/sessions/{document['id']}/step", json={"grads": GRADS})
    assert step.status_code == 200, step.text
    expected = reference.step({k: np.array(v) for k, v in GRADS.items()})
    for name, delta in expected.items():
        np.testing.assert_array_equal(np.array(step.json()["deltas"][name]), delta)


def test_the_session_document_creates_the_same_session(client: TestClient) -> None:
    """A document's "inf" is accepted back: its resolved config is a create body."""
    first = client.post(
        "/v1/sessions", json=config(clip_grad_norm={"max_norm": "inf", "norm_type": "inf"})
    ).json()
    again = {k: first[k] for k in ("optimizer", "clip_grad_norm", "dtype")}
    second = client.post("/v1/sessions", json={**again, "params": first["tensors"]})
    assert second.status_code == 201, second.text
    assert second.json()["clip_grad_norm"] == {"max_norm": "inf", "norm_type": "inf"}


@pytest.mark.parametrize("value", ["-inf", "-Infinity", 0.0, -2.0])
def test_a_norm_type_that_is_not_positive_is_refused(client: TestClient, value: Any) -> None:
    body = config(clip_grad_norm={"max_norm": 1.0, "norm_type": value})
    document = problem(client.post("/v1/sessions", json=body), 422)
    assert document["errors"][0]["field"] == "clip_grad_norm.norm_type"


def test_nan_by_name_is_refused_like_the_token(client: TestClient) -> None:
    by_name = problem(
        client.post("/v1/sessions", json=config(optimizer={"name": "SGD", "lr": "nan"})), 422
    )
    token = problem(
        client.post(
            "/v1/sessions",
            content=b'{"optimizer": {"name": "SGD", "lr": NaN}, "params": {"w": {"shape": [1]}}}',
            headers=JSON,
        ),
        422,
    )
    assert by_name["detail"] == token["detail"] == "Invalid lr value: nan"


@pytest.mark.parametrize(
    "optimizer,field",
    [
        ({"name": "CAME", "lr": 1e-3, "eps": ["nan", 1e-16]}, "optimizer.eps"),
        ({"name": "Rprop", "step_sizes": [1e-6, "nan"]}, "optimizer.step_sizes"),
        ({"name": "CAME", "lr": 1e-3, "betas": [0.9, "NaN", 0.99]}, "optimizer.betas"),
    ],
)
def test_nan_in_a_list_argument_is_refused(
    client: TestClient, optimizer: dict[str, Any], field: str
) -> None:
    """Arguments without a range check of their own refuse NaN entries too."""
    document = problem(client.post("/v1/sessions", json=config(optimizer=optimizer)), 422)
    assert document["errors"][0]["field"] == field
    assert "nan" in document["detail"]


def test_an_infinite_lr_and_the_update_it_makes(client: TestClient) -> None:
    """torch accepts lr=inf; the lr lists and the overflowed deltas are written as strings."""
    created = client.post("/v1/sessions", json=config(optimizer={"name": "SGD", "lr": "inf"}))
    assert created.status_code == 201, created.text
    document = created.json()
    assert document["lr"] == ["inf"] and document["optimizer"]["lr"] == "inf"
    step = client.post(f"/v1/sessions/{document['id']}/step", json={"grads": GRADS})
    assert step.status_code == 200, step.text
    reply = step.json()
    assert reply["lr"] == ["inf"]
    assert reply["deltas"]["b"] == ["-inf", "inf", "-inf"]
    # The safetensors reply carries the same lr in its metadata, as strict JSON.
    st = client.post(
        f"/v1/sessions/{document['id']}/step",
        content=safetensors.encode({k: np.array(v) for k, v in GRADS.items()}),
        headers={"Content-Type": SAFETENSORS, "Accept": SAFETENSORS},
    )
    assert st.status_code == 200, st.text
    _, metadata = safetensors.decode(st.content)
    assert strict_json(metadata["lr"]) == ["inf"]


def test_preview_writes_an_infinite_lr_as_inf(client: TestClient) -> None:
    body = {
        "optimizer": {"name": "SGD", "lr": "inf"},
        "schedule": {"name": "StepLR", "step_size": 1, "gamma": 0.5},
        "steps": 2,
    }
    response = client.post("/v1/schedules/preview", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["lr"] == [["inf"], ["inf"]]


def test_a_checkpoint_with_infinite_values_is_strict_and_restores(client: TestClient) -> None:
    clip = {"max_norm": 1.0, "norm_type": "inf"}
    body = config(optimizer={"name": "SGD", "lr": "inf"}, clip_grad_norm=clip)
    sid = client.post("/v1/sessions", json=body).json()["id"]
    assert client.post(f"/v1/sessions/{sid}/step", json={"grads": GRADS}).status_code == 200
    checkpoint = client.get(f"/v1/sessions/{sid}/state").content
    _, metadata = safetensors.decode(checkpoint)
    assert strict_json(metadata["state"])["groups"][0]["lr"] == "inf"
    restored = client.post(
        "/v1/sessions", content=checkpoint, headers={"Content-Type": SAFETENSORS}
    )
    assert restored.status_code == 201, restored.text
    assert restored.json()["lr"] == ["inf"]
    assert restored.json()["clip_grad_norm"] == {"max_norm": 1.0, "norm_type": "inf"}
    assert restored.json()["step"] == 1


class _Body:
    def __init__(self, content: bytes, media: str) -> None:
        self.content = content
        self.headers = {"content-type": media}


@pytest.mark.parametrize(
    "content",
    [b'{"lr": [Infinity]}', b'{"x": NaN}', b"[-Infinity]"],
    ids=["Infinity", "NaN", "-Infinity"],
)
def test_the_strict_check_refuses_the_tokens(content: bytes) -> None:
    with pytest.raises(ValueError, match="not JSON every language parses"):
        check_strict_body(_Body(content, "application/json"))
    header = safetensors.encode({}, {"lr": content.decode()})
    with pytest.raises(ValueError, match="not JSON every language parses"):
        check_strict_body(_Body(header, SAFETENSORS))

"""SOAP's preconditioners against the server's limits: a dimension too long to decompose
is refused when the group is made, and the d x d bases count against the session's
element limit at creation, on an edit before the first step and on ``add_param_group``."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.core.optimizers.soap import MAX_PRECONDITIONED_DIM
from tests.api.conftest import make_client, problem

LONG = MAX_PRECONDITIONED_DIM + 1
LIMIT = 1_000_000
"""Elements per session in these tests: far above the parameters, below their bases."""


def _create(client: TestClient, shape: list[int], **optimizer: Any) -> Any:
    config = {"optimizer": {"name": "SOAP", **optimizer}, "params": {"w": {"shape": shape}}}
    return client.post("/v1/sessions", json=config)


@pytest.mark.parametrize(
    "shape,optimizer",
    [([LONG, 3], {}), ([LONG], {"precondition_1d": True}), ([2, LONG, 2], {})],
)
def test_a_dimension_too_long_to_decompose_is_refused(
    client: TestClient, shape: list[int], optimizer: dict[str, Any]
) -> None:
    document = problem(_create(client, shape, **optimizer), 422, "invalid-hyperparameter")
    assert document["errors"][0]["field"] == "params"
    assert f"{LONG}x{LONG} preconditioner" in document["detail"]
    assert f"max_precondition_dim to {MAX_PRECONDITIONED_DIM} or less" in document["detail"]
    assert client.get("/v1/sessions").json()["sessions"] == []


def test_a_long_dimension_below_max_precondition_dim_is_left_unpreconditioned(
    client: TestClient,
) -> None:
    response = _create(client, [LONG, 3], max_precondition_dim=MAX_PRECONDITIONED_DIM)
    assert response.status_code == 201, response.text


def test_the_bases_count_against_the_element_limit() -> None:
    with make_client(max_elements_per_session=LIMIT) as client:
        # 3000 parameters, but two 1000 x 1000 matrices for the first dimension.
        document = problem(_create(client, [1000, 3]), 422, "limit-exceeded")
        assert document["maximum"] == LIMIT
        assert document["requested"] == 3000 + 2 * (1000 * 1000 + 3 * 3)
        small = _create(client, [1000, 3], max_precondition_dim=100)
        assert small.status_code == 201, small.text


def test_an_edit_that_would_outgrow_the_limit_is_refused_and_changes_nothing() -> None:
    with make_client(max_elements_per_session=LIMIT) as client:
        sid = _create(client, [1000, 3], max_precondition_dim=100).json()["id"]
        before = client.get(f"/v1/sessions/{sid}").json()
        edit = client.patch(
            f"/v1/sessions/{sid}/param_groups/0", json={"max_precondition_dim": 1000}
        )
        problem(edit, 422, "limit-exceeded")
        assert client.get(f"/v1/sessions/{sid}").json() == before


def test_an_added_group_that_would_outgrow_the_limit_is_refused() -> None:
    with make_client(max_elements_per_session=LIMIT) as client:
        sid = _create(client, [4, 4]).json()["id"]
        before = client.get(f"/v1/sessions/{sid}").json()
        added = client.post(
            f"/v1/sessions/{sid}/param_groups", json={"params": {"v": {"shape": [1000, 2]}}}
        )
        problem(added, 422, "limit-exceeded")
        problem(
            client.post(
                f"/v1/sessions/{sid}/param_groups", json={"params": {"v": {"shape": [LONG, 2]}}}
            ),
            422,
            "invalid-hyperparameter",
        )
        assert client.get(f"/v1/sessions/{sid}").json() == before


def test_a_first_gradient_overflowing_the_statistics_is_a_422_and_the_session_goes_on(
    client: TestClient,
) -> None:
    config = {
        "optimizer": {"name": "SOAP", "weight_decay": 0.0},
        "params": {"w": {"shape": [3, 3]}},
        "dtype": "float64",
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    # Finite in float64; its outer products (3e400) are not.
    huge = client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [[1e200] * 3] * 3}})
    document = problem(huge, 422, "invalid-input")
    assert "overflow SOAP's statistics" in document["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
    step = client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [[1.0] * 3] * 3}})
    assert step.status_code == 200, step.text

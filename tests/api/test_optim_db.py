"""torch's optimizer test database, run through the server against torch.optim.

Every CPU input of every optimizer in ``torch.testing._internal.common_optimizers.optim_db``
(see :mod:`tests.api.optim_db_cases`), with and without param groups and with each of its
scheduler inputs, trains the same float64 tensors for ``STEPS`` steps twice: with
torch.optim and torch's schedulers, and through the HTTP API (a session holding the
params; LBFGS answering every evaluation it asks for). The final params must agree within
float64 parity (``rtol=1e-10, atol=1e-12``). A case the server refuses must be a refusal
that docs/torch-compatibility.md lists; where torch refuses too, with torch's message.
The counts are printed at the end of the run and must be the ones the document states.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import OPTIM_DB_TALLY, make_client

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch's test utilities (optim_db) import expecttest")

from tests.api import optim_db_cases as db  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 12
RTOL, ATOL = 1e-10, 1e-12
DOC = Path(__file__).resolve().parents[2] / "docs" / "torch-compatibility.md"
CASES = db.cases()


@pytest.fixture(scope="module")
def server() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> dict[str, int]:
    counts: dict[str, int] = request.config.stash.setdefault(OPTIM_DB_TALLY, {})
    return counts


def start(case: db.Case) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Initial params and the objective's targets, seeded by nothing but the shapes."""
    rng = np.random.default_rng(7)
    initial = {n: rng.standard_normal(s) for n, s in case.shapes.items()}
    targets = [torch.tensor(rng.standard_normal(s)) for s in case.shapes.values()]
    return initial, targets


def run_server(
    server: TestClient, case: db.Case, initial: dict[str, np.ndarray], targets: list[Any]
) -> dict[str, np.ndarray] | dict[str, Any]:
    """The session's params after ``STEPS`` steps, or the problem document refusing it."""
    created = server.post("/v1/sessions", json=db.session_config(case, initial))
    if created.status_code == 422:
        problem: dict[str, Any] = created.json()
        return problem
    assert created.status_code == 201, created.text
    url = f"/v1/sessions/{created.json()['id']}/step?return=params"
    values = {n: a.copy() for n, a in initial.items()}
    for step in range(1, STEPS + 1):
        while True:  # LBFGS asks for evaluations until torch's step() would return
            loss, grads = db.loss_and_grads(values, targets)
            body = {"grads": {n: g.tolist() for n, g in grads.items()}, "loss": loss}
            reply = server.post(url, json=body)
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            values = {n: np.array(v, dtype=np.float64) for n, v in answer["params"].items()}
            if not answer.get("evaluate"):
                break
        assert answer["step"] == step
    return values


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_optim_db_case(server: TestClient, tally: dict[str, int], case: db.Case) -> None:
    initial, targets = start(case)
    got = run_server(server, case, initial, targets)
    if case.refusal is not None:
        assert "detail" in got, f"the server ran a case it should refuse: {case.refusal}"
        assert case.refusal.detail in str(got["detail"]), got
        torch_message = db.torch_refusal(case)
        if case.refusal.torch_refuses:
            assert torch_message is not None and case.refusal.detail in torch_message
        else:
            assert torch_message is None, torch_message
        tally["refused"] = tally.get("refused", 0) + 1
        return
    assert "detail" not in got, got
    expected = db.run_torch(case, initial, targets, STEPS)
    tally["run"] = tally.get("run", 0) + 1
    try:
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
    except AssertionError:
        tally["mismatched"] = tally.get("mismatched", 0) + 1
        raise
    tally["matched"] = tally.get("matched", 0) + 1


def documented_counts() -> dict[str, int]:
    text = DOC.read_text()
    found = re.search(
        r"(\d+) cases: (\d+) run, (\d+) matched, (\d+) mismatched, (\d+) refused", text
    )
    assert found is not None, "docs/torch-compatibility.md states the optim_db counts"
    keys = ("cases", "run", "matched", "mismatched", "refused")
    return dict(zip(keys, map(int, found.groups()), strict=True))


def test_documented_counts_are_the_cases() -> None:
    refused = sum(c.refusal is not None for c in CASES)
    assert documented_counts() == {
        "cases": len(CASES),
        "run": len(CASES) - refused,
        "matched": len(CASES) - refused,
        "mismatched": 0,
        "refused": refused,
    }


def test_every_refusal_is_documented() -> None:
    text = " ".join(DOC.read_text().split())
    for refusal in {c.refusal for c in CASES if c.refusal is not None}:
        assert refusal.detail in text, refusal

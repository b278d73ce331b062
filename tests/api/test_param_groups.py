"""Partial steps, group edits, added groups and the change log, against torch side by side.

Each test drives a session over HTTP and a torch.optim optimizer through the same loop
(float64, same gradients) and compares the parameters to 1e-10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import make_client, problem

torch = pytest.importorskip("torch")

TOL = {"rtol": 1e-10, "atol": 1e-12}
SHAPES = {"w": (3, 2), "b": (2,), "head": (4,)}


def _initial(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _create(client: TestClient, config: dict[str, Any], initial: dict[str, np.ndarray]) -> str:
    params = {n: {"shape": list(v.shape), "data": v.ravel().tolist()} for n, v in initial.items()}
    response = client.post("/v1/sessions", json={**config, "params": params, "dtype": "float64"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _step(client: TestClient, sid: str, grads: dict[str, np.ndarray]) -> dict[str, Any]:
    body = {"grads": {n: g.ravel().tolist() for n, g in grads.items()}}
    response = client.post(f"/v1/sessions/{sid}/step", json=body)
    assert response.status_code == 200, response.text
    reply: dict[str, Any] = response.json()
    return reply


def _params(client: TestClient, sid: str) -> dict[str, np.ndarray]:
    document = client.get(f"/v1/sessions/{sid}/params").json()
    return {n: np.asarray(v, dtype=np.float64) for n, v in document["params"].items()}


def _torch_tensors(initial: dict[str, np.ndarray]) -> dict[str, Any]:
    return {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in initial.items()}


def _torch_step(opt: Any, tensors: dict[str, Any], grads: dict[str, np.ndarray]) -> None:
    for name, t in tensors.items():
        t.grad = torch.tensor(grads[name]) if name in grads else None
    opt.step()


def _assert_same(client: TestClient, sid: str, tensors: dict[str, Any]) -> None:
    got = _params(client, sid)
    for name, t in tensors.items():
        np.testing.assert_allclose(got[name], t.detach().numpy(), **TOL, err_msg=name)


def _grads(rng: np.random.Generator, names: list[str]) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(SHAPES[n]) for n in names}


@pytest.fixture
def client() -> Any:
    with make_client() as c:
        yield c


def test_a_tensor_without_gradient_is_skipped_as_torch_skips_it(client: TestClient) -> None:
    initial = _initial()
    config = {
        "optimizer": {"name": "Adam", "lr": 0.05, "weight_decay": 0.1},
        "missing_grads": "skip",
        "clip_grad_norm": {"max_norm": 1.0},
    }
    sid = _create(client, config, initial)
    tensors = _torch_tensors(initial)
    opt = torch.optim.Adam(list(tensors.values()), lr=0.05, weight_decay=0.1)
    rng = np.random.default_rng(1)
    for n in range(20):
        names = ["w", "b"] if n % 3 else ["w", "b", "head"]
        grads = _grads(rng, names)
        for t in tensors.values():
            t.grad = None
        for name, g in grads.items():
            tensors[name].grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), 1.0)
        opt.step()
        reply = _step(client, sid, grads)
        assert sorted(reply["deltas"]) == sorted(names)
    _assert_same(client, sid, tensors)


def test_missing_tensors_are_refused_by_default(client: TestClient) -> None:
    sid = _create(client, {"optimizer": {"name": "SGD", "lr": 0.1}}, _initial())
    response = client.post(f"/v1/sessions/{sid}/step", json={"grads": {"w": [0.0] * 6}})
    assert "lacks tensor" in problem(response, 422)["detail"]
    assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_edits_apply_from_the_next_step_and_a_schedule_continues_from_them(
    client: TestClient,
) -> None:
    initial = _initial()
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
        "schedule": {"name": "ExponentialLR", "gamma": 0.9},
        "param_groups": [{"params": ["head"], "lr": 0.05}],
    }
    sid = _create(client, config, initial)
    tensors = _torch_tensors(initial)
    opt = torch.optim.SGD(
        [{"params": [tensors["w"], tensors["b"]]}, {"params": [tensors["head"]], "lr": 0.05}],
        lr=0.1,
        momentum=0.9,
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    rng = np.random.default_rng(2)
    for n in range(15):
        if n == 5:
            opt.param_groups[0]["lr"] = 0.3
            opt.param_groups[1]["weight_decay"] = 0.01
            response = client.patch(
                f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.3, "reason": "warm"}
            )
            assert response.status_code == 200, response.text
            response = client.patch(
                f"/v1/sessions/{sid}/param_groups/1", json={"weight_decay": 0.01}
            )
            assert response.json()["param_groups"][1]["weight_decay"] == 0.01
        grads = _grads(rng, list(SHAPES))
        _torch_step(opt, tensors, grads)
        sched.step()
        reply = _step(client, sid, grads)
        assert reply["lr"] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-15)
    _assert_same(client, sid, tensors)
    changes = client.get(f"/v1/sessions/{sid}/changes").json()["changes"]
    assert [(c["step"], c["group"], c["field"], c["new"]) for c in changes] == [
        (5, 0, "lr", 0.3),
        (5, 1, "weight_decay", 0.01),
    ]
    assert changes[0]["reason"] == "warm"
    assert changes[0]["old"] == pytest.approx(0.1 * 0.9**5, rel=1e-15)


def test_an_added_group_steps_as_after_add_param_group(client: TestClient) -> None:
    initial = _initial()
    frozen = {"head": initial.pop("head")}
    config = {"optimizer": {"name": "AdamW", "lr": 0.02}}
    sid = _create(client, config, initial)
    tensors = _torch_tensors({**initial, **frozen})
    opt = torch.optim.AdamW([tensors["w"], tensors["b"]], lr=0.02)
    rng = np.random.default_rng(3)
    for n in range(12):
        if n == 4:
            opt.add_param_group({"params": [tensors["head"]], "lr": 0.001, "weight_decay": 0.0})
            body = {
                "params": {"head": {"shape": [4], "data": frozen["head"].tolist()}},
                "lr": 0.001,
                "weight_decay": 0.0,
            }
            response = client.post(f"/v1/sessions/{sid}/param_groups", json=body)
            assert response.status_code == 200, response.text
            document = response.json()
            assert document["param_groups"][1]["params"] == ["head"]
            assert document["lr"] == [0.02, 0.001]
        names = ["w", "b", "head"] if n >= 4 else ["w", "b"]
        grads = _grads(rng, names)
        _torch_step(opt, tensors, grads)
        _step(client, sid, grads)
    _assert_same(client, sid, tensors)
    changes = client.get(f"/v1/sessions/{sid}/changes").json()["changes"]
    assert changes[-1]["field"] == "params" and changes[-1]["new"] == ["head"]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("param_groups/0", {"lr": -1.0}, 422, "Invalid learning rate: -1.0"),
        ("param_groups/0", {"colour": 1}, 422, "no hyperparameter 'colour'"),
        ("param_groups/0", {"lr": "fast"}, 422, "lr"),
        ("param_groups/0", {}, 422, "changes nothing"),
        ("param_groups/7", {"lr": 0.1}, 422, "does not exist"),
        ("param_groups/0", {"amsgrad": True}, 422, "after the first step"),
        ("param_groups", {"params": {"w": {"shape": [3, 2], "data": [0.0] * 6}}}, 422, "'w'"),
        ("param_groups", {"params": {"z": {"shape": [2]}}}, 422, "data"),
        ("param_groups", {"params": {"z": {"shape": [2], "data": [1, 2]}}, "eps": -1}, 422, "eps"),
        ("param_groups", {"lr": 0.1}, 422, "params"),
    ],
)
def test_bad_changes_are_refused_and_change_nothing(
    client: TestClient, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    sid = _create(client, {"optimizer": {"name": "Adam", "lr": 0.01}}, _initial())
    _step(client, sid, _grads(np.random.default_rng(0), list(SHAPES)))
    before = client.get(f"/v1/sessions/{sid}").json()
    state_before = client.get(f"/v1/sessions/{sid}/state").content
    url = f"/v1/sessions/{sid}/{path}"
    response = client.patch(url, json=body) if path[-1].isdigit() else client.post(url, json=body)
    assert words in problem(response, status)["detail"]
    after = client.get(f"/v1/sessions/{sid}").json()
    assert after == before
    assert client.get(f"/v1/sessions/{sid}/state").content == state_before
    assert client.get(f"/v1/sessions/{sid}/changes").json()["changes"] == []


def test_if_match_guards_group_changes(client: TestClient) -> None:
    sid = _create(client, {"optimizer": {"name": "SGD", "lr": 0.1}}, _initial())
    _step(client, sid, _grads(np.random.default_rng(0), list(SHAPES)))
    url = f"/v1/sessions/{sid}/param_groups/0"
    problem(client.patch(url, json={"lr": 0.2}, headers={"If-Match": '"0"'}), 412)
    ok = client.patch(url, json={"lr": 0.2}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200 and ok.json()["lr"] == [0.2]


def test_edits_added_groups_and_partial_steps_survive_a_restart(tmp_path: Path) -> None:
    initial = _initial()
    frozen = {"head": initial.pop("head")}
    config = {
        "optimizer": {"name": "Adam", "lr": 0.02, "weight_decay": 0.01},
        "missing_grads": "skip",
    }
    rng = np.random.default_rng(4)
    with make_client(storage="disk", data_dir=tmp_path) as client:
        sid = _create(client, config, initial)
        for n in range(8):
            if n == 2:
                client.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.03})
            if n == 3:
                body = {"params": {"head": {"shape": [4], "data": frozen["head"].tolist()}}}
                client.post(f"/v1/sessions/{sid}/param_groups", json=body)
            names = ["w", "head"] if n >= 3 and n % 2 else ["w", "b"]
            _step(client, sid, _grads(rng, names))
        state = client.get(f"/v1/sessions/{sid}/state").content
        document = client.get(f"/v1/sessions/{sid}").json()
        changes = client.get(f"/v1/sessions/{sid}/changes").json()
    with make_client(storage="disk", data_dir=tmp_path) as client:
        assert client.get(f"/v1/sessions/{sid}/state").content == state
        recovered = client.get(f"/v1/sessions/{sid}").json()
        assert {k: v for k, v in recovered.items() if k != "updated_at"} == {
            k: v for k, v in document.items() if k != "updated_at"
        }
        assert client.get(f"/v1/sessions/{sid}/changes").json() == changes


def test_a_checkpoint_carries_edits_added_groups_and_split_state(client: TestClient) -> None:
    initial = _initial()
    frozen = {"head": initial.pop("head")}
    sid = _create(
        client, {"optimizer": {"name": "Adam", "lr": 0.02}, "missing_grads": "skip"}, initial
    )
    rng = np.random.default_rng(5)
    _step(client, sid, _grads(rng, ["w"]))
    client.patch(f"/v1/sessions/{sid}/param_groups/0", json={"betas": [0.8, 0.99]})
    body = {"params": {"head": {"shape": [4], "data": frozen["head"].tolist()}}}
    client.post(f"/v1/sessions/{sid}/param_groups", json=body)
    checkpoint = client.get(f"/v1/sessions/{sid}/state").content
    restored = client.post(
        "/v1/sessions",
        content=checkpoint,
        headers={"Content-Type": "application/vnd.optserve.safetensors"},
    )
    assert restored.status_code == 201, restored.text
    rid = restored.json()["id"]
    assert restored.json()["param_groups"][0]["betas"] == [0.8, 0.99]
    for _ in range(3):
        grads = _grads(rng, ["w", "b", "head"])
        a, b = _step(client, sid, grads), _step(client, rid, grads)
        assert a["deltas"] == b["deltas"]
    assert len(client.get(f"/v1/sessions/{rid}/changes").json()["changes"]) == 2


def test_an_edit_repeated_changes_nothing_again(client: TestClient) -> None:
    sid = _create(client, {"optimizer": {"name": "Adam", "lr": 0.01}}, _initial())
    url = f"/v1/sessions/{sid}/param_groups/0"
    for _ in range(3):
        response = client.patch(url, json={"lr": 0.02, "betas": [0.8, 0.9]})
        assert response.status_code == 200, response.text
    changes = client.get(f"/v1/sessions/{sid}/changes").json()["changes"]
    assert [(c["field"], c["new"]) for c in changes] == [("lr", 0.02), ("betas", [0.8, 0.9])]


def test_change_log_pages_keep_every_field_of_an_edit(client: TestClient) -> None:
    sid = _create(client, {"optimizer": {"name": "SGD", "lr": 0.1}}, _initial())
    url = f"/v1/sessions/{sid}/param_groups/0"
    client.patch(url, json={"lr": 0.2, "momentum": 0.5})
    client.patch(url, json={"lr": 0.3})
    first = client.get(f"/v1/sessions/{sid}/changes", params={"limit": 1}).json()
    assert [c["field"] for c in first["changes"]] == ["lr", "momentum"]
    rest = client.get(f"/v1/sessions/{sid}/changes", params={"after": first["next"]}).json()
    assert [(c["field"], c["new"]) for c in rest["changes"]] == [("lr", 0.3)]
    assert rest["next"] is None


def test_an_added_adagrad_group_starts_from_the_constructors_accumulator(
    client: TestClient,
) -> None:
    initial = _initial()
    frozen = {"head": initial.pop("head")}
    config = {"optimizer": {"name": "Adagrad", "lr": 0.1, "initial_accumulator_value": 0.5}}
    sid = _create(client, config, initial)
    tensors = _torch_tensors({**initial, **frozen})
    opt = torch.optim.Adagrad([tensors["w"], tensors["b"]], lr=0.1, initial_accumulator_value=0.5)
    opt.add_param_group({"params": [tensors["head"]], "initial_accumulator_value": 3.0})
    body = {
        "params": {"head": {"shape": [4], "data": frozen["head"].tolist()}},
        "initial_accumulator_value": 3.0,
    }
    assert client.post(f"/v1/sessions/{sid}/param_groups", json=body).status_code == 200
    rng = np.random.default_rng(6)
    for _ in range(5):
        grads = _grads(rng, list(SHAPES))
        _torch_step(opt, tensors, grads)
        _step(client, sid, grads)
    _assert_same(client, sid, tensors)

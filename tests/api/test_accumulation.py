"""``accumulate``: k posts make one step, as torch's k backward passes of ``loss / k``.

The reference is torch itself: the same micro-batches, ``(loss / k).backward()`` k times
(``loss.backward()`` for ``"sum"``), ``clip_grad_norm_``, ``step()``, ``scheduler.step()``.
The session holds its parameters and gets each micro-batch's own gradient; after every
optimizer step its parameters must be torch's.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.api.conftest import problem
from tests.api.training_loop import Model, held_params, post_step

TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}
K = 4


def config(model: Model, dtype: str, reduction: str = "mean", **extra: Any) -> dict[str, Any]:
    return {
        "optimizer": {
            "name": "AdamW",
            "lr": 0.02,
            "betas": [0.8, 0.95],
            "weight_decay": 0.05,
            "amsgrad": True,
        },
        "schedule": {"name": "StepLR", "step_size": 7, "gamma": 0.7},
        "clip_grad_norm": {"max_norm": 0.5},
        "params": model.initial(),
        "dtype": dtype,
        "accumulate": {"steps": K, "reduction": reduction},
        **extra,
    }


def torch_loop(model: Model) -> tuple[torch.optim.Optimizer, Any]:
    params = list(model.params.values())
    opt = torch.optim.AdamW(params, lr=0.02, betas=(0.8, 0.95), weight_decay=0.05, amsgrad=True)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)


@pytest.mark.parametrize(
    ("dtype", "wire", "reduction"),
    [
        ("float32", "json", "mean"),
        ("float32", "safetensors", "mean"),
        ("float64", "json", "sum"),
        ("float64", "safetensors", "mean"),
    ],
)
def test_accumulated_steps_match_torch(
    client: TestClient, dtype: str, wire: str, reduction: str
) -> None:
    model = Model(dtype)
    sid = client.post("/v1/sessions", json=config(model, dtype, reduction)).json()["id"]
    opt, sched = torch_loop(model)
    for step in range(1, 101):
        losses = []
        for j in range(1, K + 1):
            batch = model.batch()
            grads, loss = model.grads(batch)
            losses.append(loss)
            reply = post_step(client, sid, grads, wire, loss=loss)
            scaled = model.loss(batch) / K if reduction == "mean" else model.loss(batch)
            scaled.backward()
            if j < K:
                assert reply["applied"] is False and "deltas" not in reply
                assert (reply["accumulated"], reply["of"], reply["step"]) == (j, K, step - 1)
        before = model.numpy()
        lr_used = [g["lr"] for g in opt.param_groups]
        grad_norm = torch.nn.utils.clip_grad_norm_(list(model.params.values()), 0.5)
        opt.step()
        sched.step()
        opt.zero_grad()
        assert reply["applied"] is True and (reply["accumulated"], reply["step"]) == (0, step)
        after = model.numpy()
        for name, value in held_params(client, sid).items():
            np.testing.assert_allclose(value, after[name], **TOLERANCE[dtype], err_msg=name)
        metrics = reply["metrics"]
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(metrics["grad_norm"], float(grad_norm), **tol)
        update = [after[n] - before[n] for n in after]
        np.testing.assert_allclose(
            metrics["update_norm"], np.sqrt(sum(float((u**2).sum()) for u in update)), **tol
        )
        total = np.mean(losses) if reduction == "mean" else np.sum(losses)
        loss_tol = 1e-6 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(metrics["loss"], total, rtol=loss_tol)
        assert reply["lr"] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12)
    history = client.get(f"/v1/sessions/{sid}/steps", params={"after": 396}).json()["steps"]
    assert [r["step"] for r in history] == [100]
    assert history[0]["lr"] == pytest.approx(lr_used, rel=1e-12)


def test_a_nonfinite_micro_batch_is_skipped_as_if_never_posted(client: TestClient) -> None:
    """optax's MultiSteps with skip_not_finite: the post is dropped, the count stays."""
    model = Model("float64", seed=3)
    session = config(model, "float64", nonfinite="skip")
    sid = client.post("/v1/sessions", json=session).json()["id"]
    opt, _ = torch_loop(model)
    replies = []
    for j in range(K + 1):
        if j == 2:
            bad = {n: np.full(s.shape, np.nan) for n, s in model.numpy().items()}
            replies.append(post_step(client, sid, bad, "json"))
            continue
        batch = model.batch()
        grads, _ = model.grads(batch)
        (model.loss(batch) / K).backward()
        replies.append(post_step(client, sid, grads, "json"))
    assert [r.get("accumulated") for r in replies] == [1, 2, 2, 3, 0]
    assert replies[2]["applied"] is False and "NaN" in replies[2]["skipped"]
    torch.nn.utils.clip_grad_norm_(list(model.params.values()), 0.5)
    opt.step()
    for name, value in held_params(client, sid).items():
        np.testing.assert_allclose(value, model.numpy()[name], **TOLERANCE["float64"])
    document = client.get(f"/v1/sessions/{sid}").json()
    assert (document["step"], document["skipped_steps"], document["accumulated"]) == (1, 1, 0)


def test_a_nonfinite_micro_batch_with_nonfinite_error_is_refused(client: TestClient) -> None:
    model = Model("float64")
    sid = client.post("/v1/sessions", json=config(model, "float64")).json()["id"]
    grads, _ = model.grads(model.batch())
    post_step(client, sid, grads, "json")
    bad = {"w": [[float("nan")] * 3] * 6, "b": [0.0] * 3}
    response = client.post(
        f"/v1/sessions/{sid}/step",
        content=json.dumps({"grads": bad}),
        headers={"Content-Type": "application/json"},
    )
    assert "grads.w" in str(problem(response, 422))
    assert client.get(f"/v1/sessions/{sid}").json()["accumulated"] == 1


def test_a_retried_micro_batch_is_counted_once(client: TestClient) -> None:
    model = Model("float64")
    sid = client.post("/v1/sessions", json=config(model, "float64")).json()["id"]
    grads, _ = model.grads(model.batch())
    first = post_step(client, sid, grads, "json", **{"Idempotency-Key": "mb-1"})
    again = post_step(client, sid, grads, "json", **{"Idempotency-Key": "mb-1"})
    assert first == again == {"step": 0, "lr": [0.02], "applied": False, "accumulated": 1, "of": K}
    assert client.get(f"/v1/sessions/{sid}").json()["accumulated"] == 1


def test_partial_micro_batches_sum_what_was_sent(client: TestClient) -> None:
    """A tensor left out of every micro-batch stays put; one sent in some is their sum / k."""
    model = Model("float64", seed=5)
    session = config(model, "float64", missing_grads="skip")
    session.pop("schedule")
    sid = client.post("/v1/sessions", json=session).json()["id"]
    opt, _ = torch_loop(model)
    for j in range(K):
        batch = model.batch()
        grads, _ = model.grads(batch)
        if j % 2:
            grads.pop("b")
            model.params["b"].requires_grad_(False)
        (model.loss(batch) / K).backward()
        model.params["b"].requires_grad_(True)
        reply = post_step(client, sid, grads, "json")
    torch.nn.utils.clip_grad_norm_([p for p in model.params.values() if p.grad is not None], 0.5)
    opt.step()
    assert set(reply["deltas"]) == {"w", "b"}
    for name, value in held_params(client, sid).items():
        np.testing.assert_allclose(value, model.numpy()[name], **TOLERANCE["float64"])


def test_a_checkpoint_mid_accumulation_carries_the_running_sum(client: TestClient) -> None:
    model = Model("float64", seed=7)
    sid = client.post("/v1/sessions", json=config(model, "float64")).json()["id"]
    posts = [model.grads(model.batch())[0] for _ in range(K)]
    for grads in posts[:3]:
        post_step(client, sid, grads, "json")
    state = client.get(f"/v1/sessions/{sid}/state")
    copy = client.post(
        "/v1/sessions",
        content=state.content,
        headers={"Content-Type": "application/vnd.optserve.safetensors"},
    )
    assert copy.status_code == 201, copy.text
    assert copy.json()["accumulated"] == 3
    a = post_step(client, sid, posts[3], "json")
    b = post_step(client, copy.json()["id"], posts[3], "json")
    assert a["applied"] and b["applied"]
    for name in a["deltas"]:
        np.testing.assert_array_equal(np.asarray(a["deltas"][name]), np.asarray(b["deltas"][name]))


@pytest.mark.parametrize(
    ("accumulate", "field"),
    [
        ({"steps": 0}, "accumulate.steps"),
        ({"steps": "4"}, "accumulate.steps"),
        ({"steps": True}, "accumulate.steps"),
        ({}, "accumulate.steps"),
        ({"steps": 2, "reduction": "avg"}, "accumulate.reduction"),
        ({"steps": 2, "every": 1}, "accumulate.every"),
        (4, "accumulate"),
    ],
)
def test_bad_accumulate_is_refused_naming_the_field(
    client: TestClient, accumulate: Any, field: str
) -> None:
    model = Model("float32")
    session = config(model, "float32")
    session["accumulate"] = accumulate
    document = problem(client.post("/v1/sessions", json=session), 422)
    assert field in [e.get("field") for e in document["errors"]], document
    assert client.get("/v1/sessions").json()["sessions"] == []


def test_accumulate_with_lbfgs_ask_tell_is_refused(client: TestClient) -> None:
    model = Model("float64")
    session = {
        "optimizer": {"name": "LBFGS", "line_search_fn": "strong_wolfe"},
        "params": model.initial(),
        "dtype": "float64",
        "accumulate": {"steps": 2},
    }
    document = problem(client.post("/v1/sessions", json=session), 422)
    assert "accumulate" in [e.get("field") for e in document["errors"]]


def test_a_sum_that_overflows_is_the_steps_to_skip(client: TestClient) -> None:
    """Two finite float32 micro-batches whose mean overflows: the step on it is non-finite."""
    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "params": {"w": {"shape": [2], "data": [1.0, 2.0]}},
        "accumulate": {"steps": 2, "reduction": "sum"},
        "nonfinite": "skip",
    }
    sid = client.post("/v1/sessions", json=config).json()["id"]
    huge = {"w": np.full(2, 3e38, np.float32)}
    assert post_step(client, sid, huge, "safetensors")["accumulated"] == 1
    reply = post_step(client, sid, huge, "safetensors")
    assert reply["applied"] is False and "NaN or Inf" in reply["skipped"]
    document = client.get(f"/v1/sessions/{sid}").json()
    assert (document["step"], document["accumulated"], document["skipped_steps"]) == (0, 0, 1)
    np.testing.assert_array_equal(held_params(client, sid)["w"], [1.0, 2.0])

"""RemoteOptimizer against a live server, side by side with local torch.optim.

Two copies of one model see the same batches; one is trained by torch.optim (and a
torch scheduler, and torch's clipping), the other by RemoteOptimizer with the same
configuration. float64 runs agree to 1e-10.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tests.clients.client_parity import torch_warmup_cosine, warmup_cosine

torch = pytest.importorskip("torch")

from optserve_client import Client  # noqa: E402
from optserve_client.torch import ConversionError, RemoteOptimizer  # noqa: E402

pytestmark = pytest.mark.torch

LR = 3e-3
WARMUP = 10
STEPS = 100
MAX_NORM = 0.5


def mlp(seed: int = 0, dtype: Any = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )  # fmt: skip
    return model.to(dtype or torch.float64)


def batches(count: int, dtype: Any = torch.float64) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randn(32, 6, generator=gen, dtype=dtype),
            torch.randn(32, 3, generator=gen, dtype=dtype),
        )
        for _ in range(count)
    ]


def loss_of(model: torch.nn.Module, batch: tuple[Any, Any]) -> Any:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def bias_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith("bias")]


def local_adamw(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    biases = set(bias_names(model))
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in model.named_parameters() if n not in biases]},
            {
                "params": [p for n, p in model.named_parameters() if n in biases],
                "weight_decay": 0.0,
            },
        ],
        lr=LR,
        betas=(0.9, 0.98),
        weight_decay=0.05,
    )
    return optimizer, torch_warmup_cosine(optimizer, WARMUP, STEPS, eta_min=1e-5)


REMOTE_ADAMW: dict[str, Any] = {
    "optimizer": {"name": "AdamW", "lr": LR, "betas": [0.9, 0.98], "weight_decay": 0.05},
    "schedule": warmup_cosine(WARMUP, STEPS, eta_min=1e-5),
    "clip_grad_norm": {"max_norm": MAX_NORM},
}


def local_step(model: torch.nn.Module, optimizer: Any, scheduler: Any, batch: Any) -> float:
    optimizer.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(loss.item())


def remote_step(model: torch.nn.Module, optimizer: RemoteOptimizer, batch: Any) -> float:
    optimizer.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p - q).abs().max().detach())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def test_adamw_warmup_cosine_no_decay_biases_clipping_float64_matches_torch(
    live_url: str,
) -> None:
    local = mlp()
    remote = copy.deepcopy(local)
    optimizer, scheduler = local_adamw(local)
    remote_opt = RemoteOptimizer(
        remote.named_parameters(),
        url=live_url,
        param_groups=[{"params": bias_names(remote), "weight_decay": 0.0}],
        dtype="float64",
        **REMOTE_ADAMW,
    )
    with remote_opt:
        assert remote_opt.session.dtype == np.float64
        for batch in batches(STEPS):
            local_loss = local_step(local, optimizer, scheduler, batch)
            remote_loss = remote_step(remote, remote_opt, batch)
            assert remote_loss == pytest.approx(local_loss, rel=1e-9)
            lrs = [g["lr"] for g in remote_opt.param_groups]
            np.testing.assert_allclose(lrs, scheduler.get_last_lr(), rtol=1e-12)
        assert remote_opt.session.step_count == STEPS
        remote_opt.session.delete()
    for (name, p), q in zip(local.named_parameters(), remote.parameters(), strict=True):
        np.testing.assert_allclose(
            q.detach().numpy(), p.detach().numpy(), rtol=1e-10, atol=1e-10, err_msg=name
        )
    assert max_difference(local, remote) < 1e-10
    # The run moved the parameters for real: a broken update could not pass the check.
    assert max_difference(local, mlp()) > 1e-2


def test_float32_adam_with_step_schedule_matches_torch_and_sends_no_params(
    client: Client,
) -> None:
    local = mlp(seed=5, dtype=torch.float32)
    remote = copy.deepcopy(local)
    optimizer = torch.optim.Adam(local.parameters(), lr=1e-2, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    remote_opt = RemoteOptimizer(
        remote.parameters(),
        client=client,
        optimizer={"name": "Adam", "lr": 1e-2, "amsgrad": True},
        schedule={"name": "StepLR", "step_size": 7, "gamma": 0.5},
    )
    assert remote_opt.session.dtype == np.float32 and not remote_opt._send_params
    for batch in batches(40, torch.float32):
        optimizer.zero_grad()
        loss_of(local, batch).backward()
        optimizer.step()
        scheduler.step()
        remote_step(remote, remote_opt, batch)
    for p, q in zip(local.parameters(), remote.parameters(), strict=True):
        np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def rosenbrock_problem(seed: int) -> tuple[Any, Callable[[Any], Any]]:
    torch.manual_seed(seed)
    x = torch.nn.Parameter(torch.tensor([-1.5, 2.0, 0.5, -0.5], dtype=torch.float64))

    def loss(v: Any) -> Any:
        return (100 * (v[1:] - v[:-1] ** 2) ** 2 + (1 - v[:-1]) ** 2).sum()

    return x, loss


def test_lbfgs_strong_wolfe_closure_matches_torch_call_for_call(client: Client) -> None:
    config = {"lr": 1.0, "max_iter": 8, "history_size": 5, "line_search_fn": "strong_wolfe"}
    local_x, f = rosenbrock_problem(0)
    remote_x, _ = rosenbrock_problem(0)
    local_opt = torch.optim.LBFGS([local_x], **config)
    remote_opt = RemoteOptimizer(
        [("x", remote_x)], client=client, optimizer={"name": "LBFGS", **config}
    )
    assert remote_opt.session.holds_params
    local_points: list[np.ndarray] = []
    remote_points: list[np.ndarray] = []

    def closure_for(
        x: Any, opt: torch.optim.Optimizer, seen: list[np.ndarray]
    ) -> Callable[[], Any]:
        def closure() -> Any:
            seen.append(x.detach().numpy().copy())
            opt.zero_grad()
            loss = f(x)
            loss.backward()
            return loss

        return closure

    for _ in range(4):
        local_loss = local_opt.step(closure_for(local_x, local_opt, local_points))
        remote_loss = remote_opt.step(closure_for(remote_x, remote_opt, remote_points))
        assert remote_loss.item() == pytest.approx(local_loss.item(), rel=1e-10)
    assert len(remote_points) == len(local_points) > 8
    np.testing.assert_allclose(np.array(remote_points), np.array(local_points), rtol=1e-10)
    np.testing.assert_allclose(remote_x.detach().numpy(), local_x.detach().numpy(), rtol=1e-10)
    assert remote_opt.session.step_count == 4


def test_state_dict_round_trip_continues_exactly(client: Client) -> None:
    model = mlp(seed=2)
    data = batches(30)
    opt = RemoteOptimizer(model.named_parameters(), client=client, dtype="float64", **REMOTE_ADAMW)
    for batch in data[:10]:
        remote_step(model, opt, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    for batch in data[10:]:
        remote_step(model, opt, batch)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = mlp(seed=99)
    resumed.load_state_dict(saved["model"])
    other = RemoteOptimizer(
        resumed.named_parameters(), client=client, dtype="float64", **REMOTE_ADAMW
    )
    other.load_state_dict(saved["optimizer"])
    assert (
        other.session.step_count == 10
        and other.session.id != saved["optimizer"]["optserve"]["session"]
    )
    assert [g["lr"] for g in other.param_groups] == pytest.approx(
        [g["lr"] for g in saved["optimizer"]["param_groups"]], rel=0
    )
    for batch in data[10:]:
        remote_step(resumed, other, batch)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_from_torch_mid_run_continues_identically(live_url: str) -> None:
    data = batches(60)
    local = mlp(seed=7)
    optimizer, scheduler = local_adamw(local)
    for batch in data[:25]:
        local_step(local, optimizer, scheduler, batch)

    # Fork: an identical model with the torch objects' state, handed over to the server.
    fork = copy.deepcopy(local)
    fork_opt, fork_sched = local_adamw(fork)
    fork_opt.load_state_dict(optimizer.state_dict())
    fork_sched.load_state_dict(scheduler.state_dict())
    remote_opt = RemoteOptimizer.from_torch(
        fork_opt, fork_sched, url=live_url, clip_grad_norm={"max_norm": MAX_NORM}
    )
    with remote_opt:
        assert remote_opt.session.step_count == 25
        assert [g["lr"] for g in remote_opt.param_groups] == pytest.approx(
            scheduler.get_last_lr(), rel=1e-15
        )
        for batch in data[25:]:
            local_step(local, optimizer, scheduler, batch)
            remote_step(fork, remote_opt, batch)
            np.testing.assert_allclose(
                [g["lr"] for g in remote_opt.param_groups], scheduler.get_last_lr(), rtol=1e-12
            )
        remote_opt.session.delete()
    assert max_difference(local, fork) < 1e-10


def test_to_torch_mid_run_continues_identically(client: Client) -> None:
    data = batches(50)
    model = mlp(seed=11)
    opt = RemoteOptimizer(
        model.named_parameters(),
        client=client,
        param_groups=[{"params": bias_names(model), "weight_decay": 0.0}],
        dtype="float64",
        **REMOTE_ADAMW,
    )
    for batch in data[:20]:
        remote_step(model, opt, batch)
    # A twin that stays remote: the same checkpoint in a second session.
    twin = copy.deepcopy(model)
    twin_opt = RemoteOptimizer(
        twin.named_parameters(),
        client=client,
        param_groups=[{"params": bias_names(twin), "weight_decay": 0.0}],
        dtype="float64",
        **REMOTE_ADAMW,
    )
    twin_opt.load_state_dict(opt.state_dict())

    local_opt, local_sched = opt.to_torch()
    assert isinstance(local_opt, torch.optim.AdamW)
    assert isinstance(local_sched, torch.optim.lr_scheduler.SequentialLR)
    assert local_sched.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])
    for batch in data[20:]:
        local_step(model, local_opt, local_sched, batch)
        remote_step(twin, twin_opt, batch)
    assert max_difference(model, twin) < 1e-10
    assert max_difference(model, mlp(seed=11)) > 1e-2


def test_lbfgs_state_is_not_converted(client: Client) -> None:
    x, _ = rosenbrock_problem(0)
    with pytest.raises(ConversionError, match="LBFGS"):
        RemoteOptimizer.from_torch(torch.optim.LBFGS([x]), client=client)


def test_an_infinite_hyperparameter_reaches_torch_as_a_float(client: Client) -> None:
    """The session document writes lr=inf as "inf"; the torch groups get the float back."""
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = RemoteOptimizer([w], optimizer={"name": "SGD", "lr": float("inf")}, client=client)
    try:
        assert opt.session.document["optimizer"]["lr"] == "inf"
        assert opt.defaults["lr"] == float("inf")
        assert opt.param_groups[0]["lr"] == float("inf")
    finally:
        opt.close(delete=True)

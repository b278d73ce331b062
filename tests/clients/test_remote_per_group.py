"""RemoteOptimizer with an optimizer per group, against torch's Muon and AdamW together.

The drop-in takes torch-style group dicts that name their own optimizer; the reference is
``torch.optim.Muon`` on the 2-D weights and ``torch.optim.AdamW`` on the biases, stepped
together, each with its own scheduler of the same class and arguments.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from optserve_client import Client  # noqa: E402
from optserve_client.torch import ConversionError, RemoteOptimizer  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 120
MUON = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.05, "ns_steps": 4}
ADAMW = {"lr": 3e-3, "betas": (0.85, 0.98), "weight_decay": 0.01}
COSINE = {"T_max": 80, "eta_min": 1e-4}
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}


def model(dtype: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return net.to(dtype)


def split(net: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """The 2-D weights (Muon's) and the rest (AdamW's)."""
    weights = [p for p in net.parameters() if p.ndim == 2]
    rest = [p for p in net.parameters() if p.ndim != 2]
    return weights, rest


def batches(dtype: Any) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(16, 6, generator=gen, dtype=dtype),
            torch.randn(16, 3, generator=gen, dtype=dtype),
        )
        for _ in range(STEPS)
    ]


def backward(net: torch.nn.Module, batch: tuple[Any, Any]) -> None:
    x, y = batch
    torch.nn.functional.mse_loss(net(x), y).backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("where", ["server", "local"])
def test_muon_and_adamw_groups_match_torch_stepped_together(
    client: Client, dtype: Any, where: str
) -> None:
    """The schedule runs on the server (``schedule=``), or as a local torch scheduler on
    the drop-in; either way each group follows its own initial lr, as two torch
    schedulers do."""
    local, remote_net = model(dtype), model(dtype)
    weights, rest = split(local)
    muon = torch.optim.Muon(weights, **MUON)
    adamw = torch.optim.AdamW(rest, **ADAMW)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, **COSINE) for o in (muon, adamw)]
    r_weights, r_rest = split(remote_net)
    remote = RemoteOptimizer(
        [
            {"params": r_weights, "optimizer": "Muon", **MUON},
            {"params": r_rest, "optimizer": {"name": "AdamW", **ADAMW}},
        ],
        client=client,
        schedule={"name": "CosineAnnealingLR", **COSINE} if where == "server" else None,
    )
    remote_scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(remote, **COSINE) if where == "local" else None
    )
    try:
        for batch in batches(dtype):
            for optimizer in (muon, adamw, remote):
                optimizer.zero_grad()
            backward(local, batch)
            backward(remote_net, batch)
            muon.step()
            adamw.step()
            remote.step()
            for scheduler in [*schedulers, *([remote_scheduler] if remote_scheduler else [])]:
                scheduler.step()
        document = remote.session.refresh().document
        assert document["step"] == STEPS
        assert [g["lr"] for g in remote.param_groups] == pytest.approx(
            [muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]], rel=1e-12
        )
        for ours, theirs in zip(remote_net.parameters(), local.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])
        assert [g["optimizer"] for g in document["param_groups"]] == ["Muon", "AdamW"]
        assert "betas" not in remote.param_groups[0]
    finally:
        remote.close(delete=True)


def test_a_session_of_several_optimizers_is_not_converted_to_one_torch_optimizer(
    client: Client,
) -> None:
    weights, rest = split(model(torch.float64))
    remote = RemoteOptimizer(
        [{"params": weights, "optimizer": "Muon"}, {"params": rest, "lr": 1e-3}],
        optimizer={"name": "AdamW"},
        client=client,
    )
    try:
        with pytest.raises(ConversionError, match="Muon"):
            remote.to_torch()
    finally:
        remote.close(delete=True)


def test_groups_without_an_optimizer_need_the_sessions() -> None:
    weights, rest = split(model(torch.float64))
    with pytest.raises(TypeError, match="optimizer="):
        RemoteOptimizer(
            [{"params": weights, "optimizer": "Muon"}, {"params": rest}], url="http://127.0.0.1:9"
        )


def test_an_added_group_may_name_its_own_optimizer(client: Client) -> None:
    net = model(torch.float64)
    weights, rest = split(net)
    remote = RemoteOptimizer(rest, optimizer={"name": "AdamW", **ADAMW}, client=client)
    reference_adamw = torch.optim.AdamW(
        [p.detach().clone().requires_grad_() for p in rest], **ADAMW
    )
    reference_muon = torch.optim.Muon(
        [p.detach().clone().requires_grad_() for p in weights], **MUON
    )
    try:
        remote.add_param_group({"params": weights, "optimizer": "Muon", **MUON})
        document = remote.session.refresh().document
        assert [g["optimizer"] for g in document["param_groups"]] == ["AdamW", "Muon"]
        twins = [
            *reference_adamw.param_groups[0]["params"],
            *reference_muon.param_groups[0]["params"],
        ]
        for batch in batches(torch.float64)[:20]:
            remote.zero_grad()
            backward(net, batch)
            for mine, twin in zip([*rest, *weights], twins, strict=True):
                twin.grad = mine.grad.clone()
            remote.step()
            reference_adamw.step()
            reference_muon.step()
        for mine, twin in zip([*rest, *weights], twins, strict=True):
            torch.testing.assert_close(mine, twin, **TOLERANCE[torch.float64])
    finally:
        remote.close(delete=True)

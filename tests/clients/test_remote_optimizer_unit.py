"""RemoteOptimizer's torch glue against the in-memory fake (SGD with weight decay).

Naming, group mapping, in-place updates, lr tracking and closures, checked against
torch.optim.SGD given the same groups. The numbers of every other optimizer are checked
against a live server in test_remote_optimizer.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optserve_client import Client, RetryPolicy  # noqa: E402
from optserve_client.torch import RemoteOptimizer  # noqa: E402

from tests.clients.fake_server import FakeServer  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    retry = RetryPolicy(attempts=2, backoff=0.0, jitter=False)
    with Client("http://optserve.test", transport=server.transport(), retry=retry) as c:
        yield c


def model_pair(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    local = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    local = local.double()
    remote = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    remote = remote.double()
    remote.load_state_dict(local.state_dict())
    return local, remote


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-12, err_msg=name)


def test_named_parameters_with_a_no_decay_group_match_torch_sgd(
    client: Client, server: FakeServer
) -> None:
    local, remote = model_pair()
    biases = [n for n, _ in remote.named_parameters() if n.endswith("bias")]
    opt = RemoteOptimizer(
        remote.named_parameters(),
        client=client,
        optimizer={"name": "SGD", "lr": 0.1, "weight_decay": 0.01},
        param_groups=[{"params": biases, "weight_decay": 0.0, "lr": 0.05}],
    )
    reference = torch.optim.SGD(
        [
            {"params": [p for n, p in local.named_parameters() if n not in biases]},
            {
                "params": [p for n, p in local.named_parameters() if n in biases],
                "weight_decay": 0.0,
                "lr": 0.05,
            },
        ],
        lr=0.1,
        weight_decay=0.01,
    )
    assert train(remote, opt, 20) == pytest.approx(train(local, reference, 20), rel=1e-12)
    assert_same_params(local, remote)
    session = server.sessions[opt.session.id]
    assert list(session.shapes) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert session.dtype == np.float64 and session.step == 20
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "2.weight"], biases]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    # Weight decay needs the parameter values; they travel with every step.
    assert all(b"params/" in r.content for r in server.requests if r.url.path.endswith("step"))


def test_plain_parameters_and_torch_style_groups(client: Client, server: FakeServer) -> None:
    local, remote = model_pair(seed=3)
    r_params, l_params = list(remote.parameters()), list(local.parameters())
    opt = RemoteOptimizer(
        [{"params": r_params[:2]}, {"params": r_params[2:], "lr": 0.3, "weight_decay": 0.1}],
        client=client,
        optimizer={"name": "SGD", "lr": 0.2},
    )
    reference = torch.optim.SGD(
        [{"params": l_params[:2]}, {"params": l_params[2:], "lr": 0.3, "weight_decay": 0.1}],
        lr=0.2,
    )
    train(remote, opt, 10)
    train(local, reference, 10)
    assert_same_params(local, remote)
    assert opt.names == ["param0", "param1", "param2", "param3"]
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.3]


def test_one_torch_style_group_with_options_is_the_optimizer_config(
    client: Client, server: FakeServer
) -> None:
    _, remote = model_pair()
    opt = RemoteOptimizer(
        [{"params": list(remote.parameters()), "lr": 0.7}],
        client=client,
        optimizer={"name": "SGD"},
        dtype="float32",
    )
    assert opt.param_groups[0]["lr"] == 0.7
    assert server.sessions[opt.session.id].config.get("param_groups") is None
    assert server.sessions[opt.session.id].dtype == np.float32


def test_closure_loss_is_returned_and_sent(client: Client, server: FakeServer) -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = RemoteOptimizer([weight], client=client, optimizer={"name": "SGD", "lr": 0.5})

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    np.testing.assert_allclose(weight.detach().numpy(), [0.0, 0.0])
    assert weight.grad is not None  # the closure ran with gradients enabled


def test_held_params_are_copied_in_from_the_server(client: Client, server: FakeServer) -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = RemoteOptimizer(
        [("w", weight)], client=client, optimizer={"name": "SGD", "lr": 0.25}, hold_params=True
    )
    assert opt.session.holds_params
    weight.grad = torch.tensor([4.0, 4.0], dtype=torch.float64)
    opt.step()
    np.testing.assert_array_equal(weight.detach().numpy(), [0.0, 1.0])
    np.testing.assert_array_equal(server.sessions[opt.session.id].params["w"], [0.0, 1.0])
    step = next(r for r in server.requests if r.url.path.endswith("step"))
    assert step.url.params["return"] == "params"


def test_inputs_are_checked(client: Client) -> None:
    weight = torch.nn.Parameter(torch.ones(2))
    opt = RemoteOptimizer([weight], client=client, optimizer={"name": "SGD"})
    with pytest.raises(ValueError, match="empty parameter list"):
        RemoteOptimizer([], client=client, optimizer={"name": "SGD"})
    with pytest.raises(ValueError, match="more than once"):
        RemoteOptimizer([weight, weight], client=client, optimizer={"name": "SGD"})
    with pytest.raises(ValueError, match="not a RemoteOptimizer state dict"):
        opt.load_state_dict({"state": {}, "param_groups": []})

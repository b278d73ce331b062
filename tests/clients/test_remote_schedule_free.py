"""RemoteOptimizer with a schedule-free optimizer against a live server, beside the
schedulefree package: the same training run, ``train()``/``eval()`` switching as the
package's do, the evaluation point in the tensors after ``eval()``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")

from optserve_client import Client  # noqa: E402
from optserve_client.torch import RemoteOptimizer  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 100
EVAL_EVERY = 25


@pytest.fixture
def client(live_url: str) -> Iterator[Client]:
    with Client(live_url) as c:
        yield c


def _model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(
        torch.float64
    )


def _groups(model: Any) -> list[dict[str, Any]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": 0.01}]


def _loss(model: Any, step: int) -> Any:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    return torch.nn.functional.mse_loss(model(x), y)


def _assert_same(a: Any, b: Any) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_training_and_evaluation_points_follow_the_package(client: Client) -> None:
    local_model = _model()
    remote_model = copy.deepcopy(local_model)
    args = {"lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.01, "warmup_steps": 10}
    local = schedulefree.AdamWScheduleFree(_groups(local_model), **args)
    remote = RemoteOptimizer(
        [
            {"params": [p for n, p in remote_model.named_parameters() if n.endswith("weight")]},
            {
                "params": [p for n, p in remote_model.named_parameters() if n.endswith("bias")],
                "weight_decay": 0.0,
                "lr": 0.01,
            },
        ],
        client=client,
        optimizer={"name": "AdamWScheduleFree", **{**args, "betas": list(args["betas"])}},
        clip_grad_norm=1.0,
    )
    with remote:
        # Both start in eval mode and refuse to step there, in the package's words.
        remote_model(torch.zeros(1, 5, dtype=torch.float64)).sum().backward()
        with pytest.raises(Exception, match="not in train mode"):
            remote.step()
        for step in range(STEPS):
            for model, optimizer in ((local_model, local), (remote_model, remote)):
                optimizer.train()
                optimizer.zero_grad()
                _loss(model, step).backward()
                if optimizer is local:
                    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
                    local.step()
                else:
                    remote.step()  # the session clips
            _assert_same(remote_model, local_model)
            if (step + 1) % EVAL_EVERY == 0:
                local.eval()
                remote.eval()
                _assert_same(remote_model, local_model)
                with torch.no_grad():
                    assert torch.allclose(_loss(remote_model, -1), _loss(local_model, -1))
        remote.eval()
        local.eval()
        _assert_same(remote_model, local_model)
        remote.close(delete=True)

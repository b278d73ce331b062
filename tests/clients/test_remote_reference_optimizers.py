"""RemoteOptimizer with Prodigy, CAME and SOAP against a live server, beside their
packages: the same two-group training loop, the same parameters after every step."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from optserve_client import Client  # noqa: E402
from optserve_client.torch import RemoteOptimizer  # noqa: E402

pytestmark = pytest.mark.torch

STEPS = 30
PACKAGES = {
    "Prodigy": ("prodigyopt", {"weight_decay": 0.01, "use_bias_correction": True}, {"d0": 1e-5}),
    "CAME": ("came_pytorch", {"lr": 1e-3, "weight_decay": 0.01}, {"lr": 2e-3}),
    "SOAP": ("pytorch_optimizer", {"precondition_frequency": 4}, {"lr": 0.01}),
}
"""name -> (package, arguments, the second group's overrides)."""


def _model() -> Any:
    # Square weights: SOAP's first bases are then unique (tests/core/cases/soap.py).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6)).to(
        torch.float64
    )


def _groups(model: Any, second: dict[str, Any]) -> list[dict[str, Any]]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights}, {"params": biases, **second}]


def _loss(model: Any, step: int) -> Any:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("name", list(PACKAGES))
def test_remote_training_follows_the_package(client: Client, name: str) -> None:
    package, args, second = PACKAGES[name]
    module = pytest.importorskip(package)
    local_model = _model()
    remote_model = copy.deepcopy(local_model)
    local = getattr(module, name)(_groups(local_model, second), **args)
    remote = RemoteOptimizer(
        _groups(remote_model, second), client=client, optimizer={"name": name, **args}
    )
    # SOAP's float32 QR refresh (the package's) leaves float64 runs 1e-8 apart.
    tol = {"rtol": 1e-6, "atol": 1e-8} if name == "SOAP" else {"rtol": 1e-10, "atol": 1e-12}
    with remote:
        for step in range(STEPS):
            for model, optimizer in ((local_model, local), (remote_model, remote)):
                optimizer.zero_grad()
                _loss(model, step).backward()
                optimizer.step()
            for (n, p), q in zip(
                remote_model.named_parameters(), local_model.parameters(), strict=True
            ):
                torch.testing.assert_close(p, q, **tol, msg=n)
        remote.close(delete=True)

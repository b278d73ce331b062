"""A small torch model, its micro-batches, and step posts over either wire.

The reference loops of the accumulation, metrics and averaging tests run torch on this
model; the session under test gets the same gradients through the API.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient

from service.codec import safetensors
from tests.api.conftest import SAFETENSORS

SHAPES = {"w": (6, 3), "b": (3,)}
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Model:
    """``x @ w + b`` with a squared-error loss; the batches come from a seeded generator."""

    def __init__(self, dtype: str, seed: int = 0) -> None:
        self.dtype = TORCH_DTYPES[dtype]
        self.gen = torch.Generator().manual_seed(seed)
        self.params = {
            name: torch.randn(shape, generator=self.gen, dtype=self.dtype).requires_grad_()
            for name, shape in SHAPES.items()
        }

    def initial(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"shape": list(p.shape), "data": p.detach().numpy().ravel().tolist()}
            for n, p in self.params.items()
        }

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(8, 6, generator=self.gen, dtype=self.dtype)
        y = torch.randn(8, 3, generator=self.gen, dtype=self.dtype)
        return x, y

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return ((x @ self.params["w"] + self.params["b"] - y) ** 2).mean()

    def grads(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict[str, Any], float]:
        """One micro-batch's own gradients (what a worker posts) and its loss."""
        loss = self.loss(batch)
        values = torch.autograd.grad(loss, list(self.params.values()))
        grads = {n: g.numpy() for n, g in zip(self.params, values, strict=True)}
        return grads, float(loss.detach())

    def numpy(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}


def post_step(
    client: TestClient,
    sid: str,
    grads: dict[str, np.ndarray],
    wire: str,
    loss: float | None = None,
    **headers: str,
) -> dict[str, Any]:
    """One step post; the reply as a JSON-like document (safetensors metadata decoded)."""
    if wire == "json":
        body: dict[str, Any] = {"grads": {n: g.tolist() for n, g in grads.items()}}
        if loss is not None:
            body["loss"] = loss
        # json.dumps writes NaN tokens, which requests may use (a non-finite micro-batch).
        response = client.post(
            f"/v1/sessions/{sid}/step",
            content=json.dumps(body),
            headers={"Content-Type": "application/json", **headers},
        )
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document
    metadata = {"loss": repr(loss)} if loss is not None else None
    response = client.post(
        f"/v1/sessions/{sid}/step",
        content=safetensors.encode(dict(grads), metadata),
        headers={"Content-Type": SAFETENSORS, "Accept": SAFETENSORS, **headers},
    )
    assert response.status_code == 200, response.text
    tensors, meta = safetensors.decode(response.content)
    reply: dict[str, Any] = {
        "step": int(meta["step"]),
        "lr": json.loads(meta["lr"]),
        "applied": meta["applied"] == "true",
    }
    for key in ("accumulated", "of"):
        if key in meta:
            reply[key] = int(meta[key])
    if "metrics" in meta:
        reply["metrics"] = json.loads(meta["metrics"])
    if "skipped" in meta:
        reply["skipped"] = meta["skipped"]
    if tensors:
        reply["deltas"] = {n: np.asarray(v) for n, v in tensors.items()}
    return reply


def held_params(client: TestClient, sid: str) -> dict[str, np.ndarray]:
    response = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS})
    assert response.status_code == 200, response.text
    tensors, _ = safetensors.decode(response.content)
    return {n: np.asarray(v) for n, v in tensors.items()}

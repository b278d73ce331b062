"""A server killed in the middle of an accumulation resumes with the posts it acknowledged.

Four micro-batches make a step; the server gets SIGKILL after the third of a step's posts
(snapshots every 3 events, so the running sum is both in a snapshot and in the log
after it, depending on the step), starts again on the same data directory, and the fourth
post completes the step. Every parameter is then torch's, after 12 steps with a kill in
each third one, and so is the EMA of the weights (``AveragedModel``, which started with
the first step, before the first kill), and the step history reads back whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from service.codec import safetensors
from tests.e2e.server_process import ServerProcess, running_server

K = 4
SAFETENSORS = "application/vnd.optserve.safetensors"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path, {"OPTSERVE_SNAPSHOT_EVERY": "3"}) as running:
        yield running


def test_a_kill_after_three_of_four_posts_resumes_with_three(server: ServerProcess) -> None:
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Module()
    net.w = torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.float64))
    w = net.w
    opt = torch.optim.Adam([w], lr=0.05, betas=(0.85, 0.99), weight_decay=0.02)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    config = {
        "optimizer": {"name": "Adam", "lr": 0.05, "betas": [0.85, 0.99], "weight_decay": 0.02},
        "params": {"w": {"shape": [5, 3], "data": w.detach().numpy().ravel().tolist()}},
        "dtype": "float64",
        "accumulate": {"steps": K},
        "averaging": {"kind": "ema", "decay": 0.9},
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=config).json()["id"]
        for step in range(12):
            for j in range(K):
                x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
                loss = (x @ w).square().mean()
                (g,) = torch.autograd.grad(loss, [w], retain_graph=True)
                (loss / K).backward()
                body = safetensors.encode({"w": g.numpy()})
                headers = {
                    "Content-Type": SAFETENSORS,
                    "Accept": "application/json",
                    "Idempotency-Key": f"{step}-{j}",
                }
                reply = http.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
                assert reply.status_code == 200, reply.text
                if j == K - 2 and step % 3 == 0:
                    server.kill()
                    server.start()
                    document = http.get(f"/v1/sessions/{sid}").json()
                    assert (document["accumulated"], document["step"]) == (K - 1, step)
                    # The acknowledged third post is not applied again on a retry.
                    again = http.post(f"/v1/sessions/{sid}/step", content=body, headers=headers)
                    assert again.json() == reply.json()
            opt.step()
            opt.zero_grad()
            ema.update_parameters(net)
            assert reply.json()["applied"] is True
        held = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": SAFETENSORS})
        tensors, _ = safetensors.decode(held.content)
        np.testing.assert_allclose(tensors["w"], w.detach().numpy(), rtol=1e-10, atol=1e-12)
        average = http.get(
            f"/v1/sessions/{sid}/params",
            params={"average": "true"},
            headers={"Accept": SAFETENSORS},
        )
        tensors, _ = safetensors.decode(average.content)
        want = ema.module.w.detach().numpy()
        np.testing.assert_allclose(tensors["w"], want, rtol=1e-10, atol=1e-12)
        history = http.get(f"/v1/sessions/{sid}/steps").json()["steps"]
        assert [r["step"] for r in history] == list(range(1, 13))
    assert server.restarts == 4

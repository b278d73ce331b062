"""A training run for the numpy client, and its torch reference.

AdamW with a warmup-then-cosine SequentialLR, a no-decay group for the biases and global
norm clipping, in float64, for 100 steps. Gradients come from a fixed quadratic-plus-noise
objective evaluated at the current parameters, so any error in an update changes every
later gradient.

``python -m tests.clients.client_parity`` rewrites the golden file from torch, so the
client's numbers are checked even where torch is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "adamw_sequential_clip_float64.npz"
STEPS = 100
WARMUP = 10
SHAPES: dict[str, tuple[int, ...]] = {"w1": (5, 4), "b1": (4,), "w2": (4, 2), "b2": (2,)}
BIASES = ["b1", "b2"]
MAX_NORM = 1.0


def warmup_cosine(warmup: int, steps: int, eta_min: float) -> dict[str, Any]:
    """A session schedule: lr from 0.1x up over ``warmup`` steps, then cosine to ``eta_min``."""
    return {
        "name": "SequentialLR",
        "schedulers": [
            {"name": "LinearLR", "start_factor": 0.1, "total_iters": warmup},
            {"name": "CosineAnnealingLR", "T_max": steps - warmup, "eta_min": eta_min},
        ],
        "milestones": [warmup],
    }


def torch_warmup_cosine(optimizer: Any, warmup: int, steps: int, eta_min: float) -> Any:
    """:func:`warmup_cosine` as torch's scheduler of ``optimizer``."""
    import torch

    sched = torch.optim.lr_scheduler
    return sched.SequentialLR(
        optimizer,
        [
            sched.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
            sched.CosineAnnealingLR(optimizer, T_max=steps - warmup, eta_min=eta_min),
        ],
        milestones=[warmup],
    )


CONFIG: dict[str, Any] = {
    "optimizer": {"name": "AdamW", "lr": 0.05, "betas": [0.9, 0.98], "weight_decay": 0.1},
    "schedule": warmup_cosine(WARMUP, STEPS, eta_min=1e-4),
    "param_groups": [{"params": BIASES, "weight_decay": 0.0}],
    "clip_grad_norm": {"max_norm": MAX_NORM},
    "dtype": "float64",
}


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _targets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(8)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


TARGETS = _targets()


def gradients(params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """d/dp of sum(3 (p - target)^2 / 2) plus noise that depends on the step only."""
    rng = np.random.default_rng(1000 + step)
    return {
        n: 3.0 * (params[n] - TARGETS[n]) + 0.5 * rng.standard_normal(SHAPES[n]) for n in SHAPES
    }


def torch_reference() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Final parameters and the lr of each group before each step, from torch."""
    import torch

    start = initial_params()
    tensors = {
        n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in start.items()
    }
    decay = [tensors[n] for n in SHAPES if n not in BIASES]
    no_decay = [tensors[n] for n in BIASES]
    optimizer = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.05,
        betas=(0.9, 0.98),
        weight_decay=0.1,
    )
    scheduler = torch_warmup_cosine(optimizer, WARMUP, STEPS, eta_min=1e-4)
    lrs = []
    for step in range(STEPS):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        current = {n: t.detach().numpy().copy() for n, t in tensors.items()}
        for name, grad in gradients(current, step).items():
            tensors[name].grad = torch.from_numpy(grad)
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), MAX_NORM)
        optimizer.step()
        scheduler.step()
    return {n: t.detach().numpy().copy() for n, t in tensors.items()}, np.array(lrs)


def golden() -> tuple[dict[str, np.ndarray], np.ndarray]:
    with np.load(FIXTURE) as data:
        return {n: data[f"params/{n}"] for n in SHAPES}, data["lrs"]


def write_golden() -> None:
    params, lrs = torch_reference()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(FIXTURE, lrs=lrs, **{f"params/{n}": v for n, v in params.items()})


if __name__ == "__main__":
    write_golden()
    print(f"wrote {FIXTURE}")

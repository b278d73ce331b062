"""Reduced-precision uploads and their torch reference.

A float32 SGD or Adam session stepped with gradients uploaded as bfloat16 or float16 must step
exactly as torch does on ``grad.to(dtype).to(torch.float32)``: the client rounds, the
server widens to the session's dtype. The gradients include values that round (ties to
even, the largest float16, past it), so a rounding that differs from torch's shows.

``python -m tests.clients.upload_dtype_parity`` rewrites the golden file from torch, so
the numbers are checked even where torch is not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "upload_dtype_adam_float32.npz"
STEPS = 4
SIZE = 64
DTYPES = ("bfloat16", "float16")
OPTIMIZERS = {
    # SGD passes a gradient's rounding straight into the step; Adam mostly normalizes it.
    "sgd": {"name": "SGD", "lr": 0.1, "momentum": 0.9},
    "adam": {"name": "Adam", "lr": 0.01},
}

EDGES = np.array(
    [
        1.0 + 2.0**-8,  # a bfloat16 tie: rounds to even (1.0)
        1.0 + 3 * 2.0**-8,  # a bfloat16 tie: rounds to even (up)
        1.0 + 2.0**-11,  # a float16 tie
        65504.0,  # the largest float16
        1.0e-6,  # below float16's smallest normal: subnormal
        -0.0,
    ],
    dtype=np.float32,
)
BEYOND = np.array([65520.0, -3.0e38], dtype=np.float32)
"""Rounded to inf in float16 (a step would refuse it), kept in bfloat16's range: checked
by bits, not stepped."""


def gradients() -> list[np.ndarray]:
    """The float32 gradients posted, one per step; the first carries :data:`EDGES`."""
    rng = np.random.default_rng(11)
    grads = [rng.standard_normal(SIZE).astype(np.float32) * 10 for _ in range(STEPS)]
    grads[0][: EDGES.size] = EDGES
    return grads


def initial() -> np.ndarray:
    return np.linspace(-1, 1, SIZE, dtype=np.float32)


def torch_params(optimizer_key: str, dtype: str) -> np.ndarray:
    """torch's parameters after each step on the rounded gradients, stacked."""
    import torch

    param = torch.tensor(initial(), requires_grad=True)
    options = {k: v for k, v in OPTIMIZERS[optimizer_key].items() if k != "name"}
    optimizer = getattr(torch.optim, str(OPTIMIZERS[optimizer_key]["name"]))([param], **options)
    after = []
    for grad in gradients():
        param.grad = torch.from_numpy(grad).to(getattr(torch, dtype)).to(torch.float32)
        optimizer.step()
        after.append(param.detach().numpy().copy())
    return np.stack(after)


def torch_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    import torch

    rounded = torch.from_numpy(values).to(torch.bfloat16)
    return rounded.view(torch.int16).numpy().view(np.uint16)


def probe_values() -> np.ndarray:
    """Values whose bfloat16 rounding is checked bit for bit: edges, NaN, inf, random."""
    rng = np.random.default_rng(5)
    random = rng.standard_normal(4096).astype(np.float32) * np.float32(1e3)
    special = np.array([np.nan, np.inf, -np.inf, 3.4028235e38, -3.4028235e38], np.float32)
    return np.concatenate([EDGES, BEYOND, special, random])


def write_fixture() -> None:
    FIXTURE.parent.mkdir(exist_ok=True)
    np.savez(
        FIXTURE,
        **{f"{key}_{dtype}": torch_params(key, dtype) for key in OPTIMIZERS for dtype in DTYPES},
        bfloat16_bits=torch_bfloat16_bits(probe_values()),
    )


if __name__ == "__main__":
    write_fixture()
    print(f"wrote {FIXTURE}")

"""The schedulefree package's evaluation point and group scalars after a parity case.

Parameters are compared by the parity cases; these add what ``eval()`` puts in the
parameters (``x``) and what the package keeps per group (``k``, ``weight_sum``,
``lr_max``). ``make_schedule_free_fixtures`` commits them for runs without the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.core.cases import Case
from tests.core.cases.beyond_torch import CASES
from tests.core.parity_inputs import make_inputs

FIXTURES = Path(__file__).parent / "fixtures" / "schedule_free"
GROUP_SCALARS = ("k", "weight_sum", "lr_max")
NAMES = ("AdamWScheduleFree", "SGDScheduleFree")
EVAL_CASES = [
    c
    for c in CASES
    if c.config["optimizer"]["name"] in NAMES and set(c.config) == {"optimizer", "params", "dtype"}
]
"""One group, no clipping or schedule: what ``update`` alone must match."""


def run_package(case: Case) -> dict[str, np.ndarray]:
    """``eval/<name>``: the evaluation point; ``train/<name>``: the parameters after
    ``train()`` again; ``group/<scalar>``: each group's scalars, in group order."""
    import torch

    from tests.core.torch_reference import build_optimizer

    torch.set_num_threads(1)
    inputs = make_inputs(case)
    dtype = getattr(torch, case.config["dtype"])
    tensors = {
        n: torch.tensor(v, dtype=dtype, requires_grad=True) for n, v in inputs.initial.items()
    }
    optimizer: Any = build_optimizer(torch, case.config, tensors)
    for step_grads in inputs.grads:
        for name, t in tensors.items():
            t.grad = torch.tensor(step_grads[name], dtype=dtype)
        optimizer.step()
    optimizer.eval()
    result = {f"eval/{n}": t.detach().numpy().copy() for n, t in tensors.items()}
    optimizer.train()
    result |= {f"train/{n}": t.detach().numpy().copy() for n, t in tensors.items()}
    for key in GROUP_SCALARS:
        result[f"group/{key}"] = np.array([float(g[key]) for g in optimizer.param_groups])
    return result


def fixture_path(case: Case) -> Path:
    return FIXTURES / f"{case.id}.npz"


def load(case: Case) -> dict[str, np.ndarray]:
    with np.load(fixture_path(case)) as data:
        return {name: data[name] for name in data.files}

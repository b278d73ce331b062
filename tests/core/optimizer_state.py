"""Optimizer state after a parity case, from optserve's ``update`` and from torch.optim.

The parity tests compare parameters; these helpers let an optimizer's tests compare the
state too (moments, averages, step sizes, float32 scalars), which is what a restored
checkpoint continues from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tests.core.cases import Case
from tests.core.parity_inputs import make_inputs
from tests.core.update_run import UpdateRun

STATE_TOLERANCE = {"float32": (1e-5, 1e-5 / 10), "float64": (1e-10, 1e-10 / 10)}
"""(rtol, atol) per dtype for moments and averages compared with torch's."""


def optserve_state(case: Case) -> Any:
    """The state record after driving ``update`` over every step of the case."""
    run = UpdateRun(case)
    for grads in run.grads():
        run.step(grads, run.needed_params())
    return run.state


def torch_state(case: Case) -> dict[str, dict[str, Any]]:
    """torch's per-tensor state after the case's steps: arrays, and 0-d tensors as floats
    (Python numbers, as prodigyopt keeps its step count, as they are)."""
    import torch

    from tests.core.torch_reference import build_optimizer

    inputs = make_inputs(case)
    dtype = getattr(torch, case.config.get("dtype", "float32"))
    tensors = {
        name: torch.tensor(value, dtype=dtype, requires_grad=True)
        for name, value in inputs.initial.items()
    }
    optimizer = build_optimizer(torch, case.config, tensors)
    for step_grads in inputs.grads:
        for name, t in tensors.items():
            t.grad = torch.tensor(step_grads[name], dtype=dtype)
        optimizer.step()
    return {
        name: {
            key: value
            if not isinstance(value, torch.Tensor)
            else value.item()
            if value.ndim == 0
            else value.detach().numpy().copy()
            for key, value in optimizer.state[t].items()
        }
        for name, t in tensors.items()
    }


def assert_state_matches_torch(
    case: Case,
    *,
    scalars: Sequence[str],
    tensors: Sequence[str],
    tolerance: Mapping[str, tuple[float, float]] | None,
) -> None:
    """optserve's state after the case against torch's, tensor by tensor.

    ``scalars`` (a step count, float32 factors kept as Python floats) must be equal: the
    same bits as torch's. ``tensors`` must be close within ``tolerance[dtype]`` (rtol,
    atol), or equal to the bit where ``tolerance`` is None.
    """
    ours, theirs = optserve_state(case), torch_state(case)
    for i, name in enumerate(case.config["params"]):
        for key in scalars:
            assert getattr(ours, key) == theirs[name][key], key
        for key in tensors:
            mine, torchs = getattr(ours, key)[i], theirs[name][key]
            if tolerance is None:
                np.testing.assert_array_equal(mine, torchs, err_msg=key)
            else:
                rtol, atol = tolerance[case.config["dtype"]]
                np.testing.assert_allclose(mine, torchs, rtol=rtol, atol=atol, err_msg=key)

"""Optimizer state after a parity case, from optserve's ``update`` and from torch.optim.

The parity tests compare parameters; these helpers let an optimizer's tests compare the
state too (moments, averages, step sizes, float32 scalars), which is what a restored
checkpoint continues from.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core import optimizers
from tests.core.cases import Case
from tests.core.parity_inputs import make_inputs


def optserve_state(case: Case) -> Any:
    """The state record after driving ``update`` over every step of the case."""
    given = dict(case.config["optimizer"])
    optimizer = optimizers.get(given.pop("name"))
    hp = optimizer.resolve(given)
    inputs = make_inputs(case)
    names = list(case.config["params"])
    dtype = np.dtype(case.config.get("dtype", "float32"))
    params = [inputs.initial[n].copy() for n in names]
    state = optimizer.init([p.shape for p in params], hp, dtype)
    out = [np.empty_like(p) for p in params]
    for step_grads in inputs.grads:
        given_params = params if optimizer.needs_params(hp) else None
        state = optimizer.update([step_grads[n] for n in names], state, given_params, hp, out)
        for p, d in zip(params, out, strict=True):
            p += d
    return state


def torch_state(case: Case) -> dict[str, dict[str, Any]]:
    """torch's per-tensor state after the case's steps: arrays, and 0-d tensors as floats."""
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
            key: value.item() if value.ndim == 0 else value.detach().numpy().copy()
            for key, value in optimizer.state[t].items()
        }
        for name, t in tensors.items()
    }

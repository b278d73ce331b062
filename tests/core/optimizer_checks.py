"""Checks shared by the per-optimizer tests: ``update`` alone against torch, and validation.

The parity cases in ``tests/core/cases`` run through the whole training step; these
helpers drive one optimizer's ``init``/``update`` directly, so a failure points at the
update rule itself. The reference is live torch when importable, else the committed
golden fixture of the same case.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.optimizers.base import Optimizer
from service.core.state import from_flat, to_flat
from tests.core import golden
from tests.core.cases import Case
from tests.core.parity_inputs import make_inputs

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


def _optimizer_and_hparams(config: Mapping[str, Any]) -> tuple[Optimizer[Any], dict[str, Any]]:
    given = dict(config["optimizer"])
    optimizer = optimizers.get(given.pop("name"))
    return optimizer, optimizer.resolve(given)


def run_update(case: Case, steps: int | None = None) -> dict[str, np.ndarray]:
    """Parameters after driving ``update`` over the case's gradients, one group, no extras."""
    optimizer, hp = _optimizer_and_hparams(case.config)
    inputs = make_inputs(case)
    names = list(case.config["params"])
    dtype = np.dtype(case.config.get("dtype", "float32"))
    params = [inputs.initial[n].copy() for n in names]
    state = optimizer.init([p.shape for p in params], hp, dtype)
    out = [np.empty_like(p) for p in params]
    for step_grads in inputs.grads[:steps]:
        grads = [step_grads[n].copy() for n in names]
        for g in grads:
            g.setflags(write=False)  # update must treat gradients as read-only
        given_params = params if optimizer.needs_params(hp) else None
        state = optimizer.update(grads, state, given_params, hp, out)
        for p, d in zip(params, out, strict=True):
            p += d
    return dict(zip(names, params, strict=True))


def reference(case: Case) -> dict[str, np.ndarray]:
    if HAVE_TORCH:
        from tests.core.torch_reference import run_torch

        return run_torch(case.config, make_inputs(case))
    return golden.load(case)


def assert_update_matches_torch(case: Case) -> None:
    expected = reference(case)
    got = run_update(case)
    tol = TOLERANCE[case.config.get("dtype", "float32")]
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_allclose(
            got[name], expected[name], rtol=tol["rtol"], atol=tol["atol"], err_msg=name
        )


def assert_checkpoint_continues_exactly(case: Case, prime: int = 7, more: int = 7) -> None:
    """Flatten the state mid-run, rebuild it, and continue in lockstep with the original."""
    optimizer, hp = _optimizer_and_hparams(case.config)
    inputs = make_inputs(case)
    names = list(case.config["params"])
    dtype = np.dtype(case.config.get("dtype", "float32"))
    params = [inputs.initial[n].copy() for n in names]
    state = optimizer.init([p.shape for p in params], hp, dtype)
    out = [np.empty_like(p) for p in params]
    for step_grads in inputs.grads[:prime]:
        state = optimizer.update([step_grads[n] for n in names], state, params, hp, out)
        for p, d in zip(params, out, strict=True):
            p += d
    arrays, scalars = to_flat(state)
    restored = from_flat(
        optimizer.state_type, {k: v.copy() for k, v in arrays.items()}, dict(scalars)
    )
    twin = [p.copy() for p in params]
    twin_out = [np.empty_like(p) for p in params]
    for step_grads in inputs.grads[prime : prime + more]:
        grads = [step_grads[n] for n in names]
        state = optimizer.update(grads, state, params, hp, out)
        restored = optimizer.update(grads, restored, twin, hp, twin_out)
        for p, d, q, e in zip(params, out, twin, twin_out, strict=True):
            p += d
            q += e
    for p, q in zip(params, twin, strict=True):
        np.testing.assert_array_equal(p, q)


def assert_rejected(name: str, given: Mapping[str, Any], argument: str, message: str) -> None:
    """optserve names the argument and value, in torch's words; torch agrees when present."""
    optimizer = optimizers.get(name)
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizer.resolve(given, where="optimizer.")
    assert caught.value.argument == f"optimizer.{argument}"
    assert str(caught.value) == message
    if HAVE_TORCH:
        import torch

        torch_given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
        param = torch.zeros(2, requires_grad=True)
        with pytest.raises(ValueError) as torch_caught:
            getattr(torch.optim, optimizer.name)([param], **torch_given)
        assert str(torch_caught.value) == message


def assert_signature_matches_torch(name: str) -> None:
    """Same argument names, order and defaults as torch's constructor (minus device knobs)."""
    if not HAVE_TORCH:
        pytest.skip("compares against torch's constructor signature")
    import torch

    optimizer = optimizers.get(name)
    signature = inspect.signature(getattr(torch.optim, optimizer.name).__init__)
    torch_args = [
        (p.name, p.default)
        for p in signature.parameters.values()
        if p.name not in ("self", "params", *optimizer.unsupported)
    ]
    ours = [(a.name, a.default) for a in optimizer.args]
    # Order within torch's positional and keyword-only parts is kept; compare as sets of
    # pairs plus the positional prefix, since keyword-only order carries no meaning.
    assert dict(ours) == dict(torch_args)
    positional = [
        p.name
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and p.name not in ("self", "params", *optimizer.unsupported)
    ]
    assert [a.name for a in optimizer.args][: len(positional)] == positional

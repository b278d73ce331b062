"""Checks shared by the per-optimizer tests: ``update`` alone against torch, and validation.

The parity cases in ``tests/core/cases`` run through the whole training step; these
helpers drive one optimizer's ``init``/``update`` directly, so a failure points at the
update rule itself. The reference is live torch when importable, else the committed
golden fixture of the same case.

Each ``assert_*`` check has a test maker below it that parametrizes it over an
optimizer's table (its cases, names, invalid arguments); an optimizer's test module
binds what the makers return to its ``test_*`` names and adds what is its own.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.state import from_flat, to_flat
from tests.core import golden
from tests.core.cases import Case, case_ids
from tests.core.optimizer_state import assert_state_matches_torch
from tests.core.parity_inputs import make_inputs
from tests.core.reference_classes import available, config_available, reference_class
from tests.core.update_run import UpdateRun

HAVE_TORCH = importlib.util.find_spec("torch") is not None
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}


def run_update(case: Case, steps: int | None = None) -> dict[str, np.ndarray]:
    """Parameters after driving ``update`` over the case's gradients, one group, no extras."""
    run = UpdateRun(case)
    for step_grads in run.grads(stop=steps):
        grads = [g.copy() for g in step_grads]
        for g in grads:
            g.setflags(write=False)  # update must treat gradients as read-only
        run.step(grads, run.needed_params())
    return run.by_name()


def reference(case: Case) -> dict[str, np.ndarray]:
    if HAVE_TORCH and config_available(case.config):
        from tests.core.torch_reference import run_torch

        return run_torch(case.config, make_inputs(case))
    return golden.load(case)


def assert_update_matches_torch(case: Case) -> None:
    expected = reference(case)
    got = run_update(case)
    tol = case.tolerance_of(TOLERANCE)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype
        np.testing.assert_allclose(
            got[name], expected[name], rtol=tol["rtol"], atol=tol["atol"], err_msg=name
        )


def assert_checkpoint_continues_exactly(case: Case, prime: int = 7, more: int = 7) -> None:
    """Flatten the state mid-run, rebuild it, and continue in lockstep with the original."""
    run = UpdateRun(case)
    for grads in run.grads(stop=prime):
        run.step(grads, run.params)
    arrays, scalars = to_flat(run.state)
    restored = from_flat(
        run.optimizer.state_type, {k: v.copy() for k, v in arrays.items()}, dict(scalars)
    )
    twin = run.fork(restored)
    for grads in run.grads(prime, prime + more):
        run.step(grads, run.params)
        twin.step(grads, twin.params)
    for p, q in zip(run.params, twin.params, strict=True):
        np.testing.assert_array_equal(p, q)


def _refused_by_optserve(name: str, given: Mapping[str, Any], argument: str, message: str) -> None:
    with pytest.raises(InvalidHyperparameter) as caught:
        optimizers.get(name).resolve(given, where="optimizer.")
    assert caught.value.argument == f"optimizer.{argument}"
    assert str(caught.value) == message


def _construct_reference(name: str, given: Mapping[str, Any]) -> None:
    """The reference optimizer on one tensor with ``given`` (lists as torch's tuples)."""
    import torch

    torch_given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    reference_class(optimizers.get(name).name)([torch.zeros(2, requires_grad=True)], **torch_given)


def assert_rejected(name: str, given: Mapping[str, Any], argument: str, message: str) -> None:
    """optserve names the argument and value, in torch's words; torch agrees when present."""
    _refused_by_optserve(name, given, argument, message)
    if HAVE_TORCH and available(name):
        # Any exception: pytorch_optimizer raises its own NegativeLRError; the message is
        # what is compared.
        with pytest.raises(Exception) as torch_caught:
            _construct_reference(name, given)
        if torch_caught.type is AssertionError:
            # lion-pytorch asserts its ranges, with no message to compare.
            assert str(torch_caught.value) == ""
        else:
            assert str(torch_caught.value) == message


def assert_signature_matches_torch(name: str) -> None:
    """Same argument names, order and defaults as torch's constructor (minus device knobs)."""
    if not HAVE_TORCH or not available(name):
        pytest.skip("compares against the reference constructor's signature")
    optimizer = optimizers.get(name)
    signature = inspect.signature(reference_class(optimizer.name).__init__)
    # A package's **kwargs (pytorch_optimizer's) names no argument.
    named = [
        p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    torch_args = [
        (p.name, p.default)
        for p in named
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


# Test makers. Each returns a fresh (parametrized) test function; pytest collects it under
# the name the optimizer's test module binds it to, so test ids read as if written there.

PytestFunction = Callable[..., None]
Rejection = tuple[dict[str, Any], str, str]
"""The arguments given, the argument named in the error, and torch's message."""


def updates_match_torch(cases: Sequence[Case]) -> PytestFunction:
    """See :func:`assert_update_matches_torch`, once per case."""

    @pytest.mark.parametrize("case", cases, ids=case_ids(cases))
    def test(case: Case) -> None:
        assert_update_matches_torch(case)

    return test


def checkpoints_continue_exactly(
    cases: Sequence[Case], prime: int = 7, more: int = 7
) -> PytestFunction:
    """See :func:`assert_checkpoint_continues_exactly`, once per case."""

    @pytest.mark.parametrize("case", cases, ids=case_ids(cases))
    def test(case: Case) -> None:
        assert_checkpoint_continues_exactly(case, prime=prime, more=more)

    return test


def state_matches_torch(
    cases: Sequence[Case],
    *,
    scalars: Sequence[str],
    tensors: Sequence[str],
    tolerance: Mapping[str, tuple[float, float]] | None,
) -> PytestFunction:
    """See :func:`assert_state_matches_torch`; skipped without torch (no state fixtures)."""

    @pytest.mark.torch
    @pytest.mark.skipif(not HAVE_TORCH, reason="compares against torch's state tensors")
    @pytest.mark.parametrize("case", cases, ids=case_ids(cases))
    def test(case: Case) -> None:
        if not config_available(case.config):
            pytest.skip("the reference package is not installed")
        assert_state_matches_torch(case, scalars=scalars, tensors=tensors, tolerance=tolerance)

    return test


def signatures_match_torch(*names: str) -> PytestFunction:
    """One test; parametrized by optimizer when a module covers several."""
    if len(names) == 1:

        def test_one() -> None:
            assert_signature_matches_torch(names[0])

        return test_one

    @pytest.mark.parametrize("name", names)
    def test(name: str) -> None:
        assert_signature_matches_torch(name)

    return test


def assert_refused_beyond_package(
    name: str, given: Mapping[str, Any], argument: str, message: str
) -> None:
    """optserve refuses a value its reference package takes (and then runs on meaninglessly):
    naming the argument, and the package indeed taking it when present (the difference
    docs/torch-compatibility.md lists)."""
    _refused_by_optserve(name, given, argument, message)
    if HAVE_TORCH and available(name):
        _construct_reference(name, given)


def refused_beyond_package(name: str, rows: Sequence[Rejection]) -> PytestFunction:
    """:func:`assert_refused_beyond_package` for every row."""

    @pytest.mark.parametrize(("given", "argument", "message"), rows)
    def test(given: Mapping[str, object], argument: str, message: str) -> None:
        assert_refused_beyond_package(name, given, argument, message)

    return test


def invalid_hyperparameters_rejected(table: Mapping[str, Sequence[Rejection]]) -> PytestFunction:
    """Every row of every optimizer in ``table``; parametrized by optimizer when several."""
    if len(table) == 1:
        [(name, rows)] = table.items()

        @pytest.mark.parametrize(("given", "argument", "message"), rows)
        def test_one(given: Mapping[str, object], argument: str, message: str) -> None:
            assert_rejected(name, given, argument, message)

        return test_one

    every = [(name, *row) for name, rows in table.items() for row in rows]

    @pytest.mark.parametrize(("name", "given", "argument", "message"), every)
    def test(name: str, given: Mapping[str, object], argument: str, message: str) -> None:
        assert_rejected(name, given, argument, message)

    return test

"""Partial steps in core: split state, merge it back, carry it through checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.core.partial import Parts
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state, state_from_flat, state_to_flat

SHAPES = {"w": {"shape": [3, 2]}, "b": {"shape": [2]}, "h": {"shape": [4]}}


def _plan(optimizer: dict[str, object], missing: str = "skip") -> object:
    return plan_from_config(
        {"optimizer": optimizer, "params": SHAPES, "dtype": "float64", "missing_grads": missing}
    )


def _step(plan, state, present, rng):  # type: ignore[no-untyped-def]
    grads = [rng.standard_normal(t.shape) if t.name in present else None for t in plan.tensors]
    out = [np.empty(t.shape) for t in plan.tensors]
    apply_step(plan, state, grads, None, out)
    return out


def test_a_skipped_tensor_keeps_its_state_and_does_not_move() -> None:
    plan = _plan({"name": "Adam", "lr": 0.1})
    state = initial_state(plan)
    rng = np.random.default_rng(0)
    _step(plan, state, {"w", "b", "h"}, rng)
    out = _step(plan, state, {"w", "b"}, rng)
    assert np.all(out[2] == 0)
    parts = state.opt_states[0]
    assert isinstance(parts, Parts)
    steps = {positions: record.step for positions, record in parts.parts}
    assert steps == {(0, 1): 2, (2,): 1}


def test_parts_merge_once_their_scalars_agree() -> None:
    plan = _plan({"name": "Adagrad", "lr": 0.1})
    state = initial_state(plan)
    rng = np.random.default_rng(1)
    _step(plan, state, {"w"}, rng)
    assert isinstance(state.opt_states[0], Parts)
    _step(plan, state, {"b", "h"}, rng)
    # Every tensor has stepped once: one record again, arrays in the group's order.
    record = state.opt_states[0]
    assert not isinstance(record, Parts)
    assert record.step == 1
    assert [s.shape for s in record.sum] == [(3, 2), (2,), (4,)]


def test_a_split_state_survives_a_checkpoint_exactly() -> None:
    plan = _plan({"name": "AdamW", "lr": 0.05, "weight_decay": 0.0})
    state = initial_state(plan)
    rng = np.random.default_rng(2)
    for present in ({"w", "b", "h"}, {"h"}, {"w", "h"}):
        _step(plan, state, present, rng)
    arrays, meta = state_to_flat(plan, state)
    restored = state_from_flat(plan, arrays, meta)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for present in ({"w", "b"}, {"w", "b", "h"}):
        expected = _step(plan, state, present, a)
        got = _step(plan, restored, present, b)
        for e, g in zip(expected, got, strict=True):
            np.testing.assert_array_equal(e, g)


def test_missing_tensors_are_refused_unless_the_session_skips_them() -> None:
    plan = _plan({"name": "SGD", "lr": 0.1}, missing="error")
    state = initial_state(plan)
    with pytest.raises(InvalidInput, match="lacks tensor 'h'"):
        _step(plan, state, {"w", "b"}, np.random.default_rng(0))
    assert state.step == 0

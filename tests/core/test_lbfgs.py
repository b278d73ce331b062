"""LBFGS: the ask/tell machine asks for exactly the points torch's closure is called at.

References come from live torch when it is importable, else from the fixtures that
``python -m tests.core.make_lbfgs_fixtures`` wrote under ``fixtures/lbfgs``.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import re
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.optimizers import get
from service.core.optimizers.lbfgs import (
    FIXED,
    LBFGS,
    LS_BRACKET,
    LS_ZOOM,
    START,
    LBFGSState,
    _cubic_interpolate,
)
from service.core.state import from_flat, to_flat
from tests.core.lbfgs_scenarios import (
    ASK_TELL,
    FIXTURES,
    PLATEAU,
    SCENARIOS,
    SINGLE_ITERATION,
    OptserveRun,
    Scenario,
    Trace,
    describe,
    load_fixture,
    run_torch,
)
from tests.core.recorded import assert_current

HAVE_TORCH = importlib.util.find_spec("torch") is not None
POINT_ATOL = 1e-10
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-6}, "float64": {"rtol": 1e-10, "atol": 1e-12}}

optimizer: LBFGS = get("LBFGS")  # type: ignore[assignment]


def reference(scenario: Scenario) -> Trace:
    return run_torch(scenario) if HAVE_TORCH else load_fixture(scenario)


def ids(scenarios: list[Scenario]) -> list[str]:
    return [s.id for s in scenarios]


# ---- parity with torch --------------------------------------------------------------


@pytest.mark.parametrize("scenario", ASK_TELL, ids=ids(ASK_TELL))
def test_asked_points_are_torchs_closure_calls(scenario: Scenario) -> None:
    expected = reference(scenario)
    got = OptserveRun(scenario).run()
    # The same number of evaluations, with step() returning after the same ones ...
    assert got.step_ends == expected.step_ends
    assert got.func_evals == expected.func_evals
    assert got.n_iter == expected.n_iter
    # ... at the same points, and ending at the same parameters.
    np.testing.assert_allclose(
        np.array(got.points), np.array(expected.points), rtol=0, atol=POINT_ATOL
    )
    np.testing.assert_allclose(
        np.array(got.params), np.array(expected.params), rtol=0, atol=POINT_ATOL
    )


@pytest.mark.parametrize("scenario", SINGLE_ITERATION, ids=ids(SINGLE_ITERATION))
def test_single_iteration_updates_match_torch_steps(scenario: Scenario) -> None:
    """max_iter=1 without line search: ``update`` is one ``step(closure)`` per gradient."""
    expected = reference(scenario)
    run = OptserveRun(scenario)
    assert not optimizer.ask_tell(run.hp)
    got = run.run()
    assert got.step_ends == list(range(1, scenario.steps + 1))
    assert got.func_evals == expected.func_evals
    assert got.n_iter == expected.n_iter
    tol = TOLERANCE[scenario.dtype]
    for step, (mine, theirs) in enumerate(zip(got.params, expected.params, strict=True)):
        np.testing.assert_allclose(
            mine, theirs, rtol=tol["rtol"], atol=tol["atol"], err_msg=f"after step {step + 1}"
        )


def test_scenarios_reach_every_part_of_the_machine() -> None:
    """Guards the parity tests' reach: each kind of suspension and of step ending occurs."""
    phases: set[str] = set()
    one_eval_steps = 0
    for scenario in ASK_TELL:
        run = OptserveRun(scenario)
        trace = run.run()
        phases.update(run.phases)
        starts = [0, *trace.step_ends]
        one_eval_steps += sum(1 for a, b in itertools.pairwise(starts) if b - a == 1)
    assert phases == {START, FIXED, LS_BRACKET, LS_ZOOM}
    assert one_eval_steps > 0


@pytest.mark.skipif(not HAVE_TORCH, reason="checks committed fixtures against live torch")
@pytest.mark.parametrize("scenario", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_fixture_is_current(scenario: Scenario) -> None:
    hint = f"run: python -m tests.core.make_lbfgs_fixtures {scenario.id}"
    index = json.loads((FIXTURES / "index.json").read_text())
    assert scenario.id in index, hint
    recorded = {k: v for k, v in index[scenario.id].items() if k != "torch"}
    assert recorded == json.loads(json.dumps(describe(scenario))), hint
    stored, live = load_fixture(scenario), run_torch(scenario)
    assert stored.step_ends == live.step_ends, hint
    assert_current(np.array(stored.points), np.array(live.points), hint, scenario.dtype)


# ---- resuming from a checkpoint -----------------------------------------------------


def round_trip(state: LBFGSState) -> LBFGSState:
    """Through bytes, as a checkpoint goes: npz for the arrays, JSON for the rest."""
    arrays, scalars = to_flat(state)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer) as stored:
        loaded = {name: stored[name] for name in stored.files}
    return from_flat(LBFGSState, loaded, json.loads(json.dumps(scalars)))


@pytest.mark.parametrize("scenario", ASK_TELL, ids=ids(ASK_TELL))
def test_state_restored_before_every_tell_continues_identically(scenario: Scenario) -> None:
    baseline = OptserveRun(scenario)
    expected = baseline.run()
    restored_in: set[str] = set()

    def restore(run: OptserveRun) -> None:
        restored_in.add(run.state.phase)
        run.state = round_trip(run.state)

    resumed = OptserveRun(scenario)
    got = resumed.run(observe=restore)
    assert restored_in == set(baseline.phases)
    assert got.step_ends == expected.step_ends
    for mine, theirs in zip(resumed.outs, baseline.outs, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)


def test_restored_state_shares_no_memory_and_keeps_dtypes() -> None:
    checked: list[str] = []

    def check(run: OptserveRun) -> None:
        state = run.state
        if state.phase != LS_ZOOM or not state.old_dirs or checked:
            return
        copy = round_trip(state)
        assert copy.bracket == state.bracket and copy.ro == state.ro
        assert copy.x is not None and state.x is not None
        assert copy.x.dtype == state.x.dtype and not np.shares_memory(copy.x, state.x)
        assert len(copy.old_dirs) == len(state.old_dirs) > 0
        checked.append(state.phase)

    OptserveRun(SCENARIOS["rosenbrock-wolfe"]).run(observe=check)
    assert checked == [LS_ZOOM]


# ---- the protocol -------------------------------------------------------------------


def _grads(value: float = 1.0) -> list[np.ndarray]:
    return [np.full(2, value), np.full((1, 2), -value)]


def test_evaluate_and_completed_follow_torchs_step() -> None:
    hp = optimizer.resolve({"line_search_fn": "strong_wolfe", "max_iter": 2})
    state = optimizer.init([(2,), (1, 2)], hp, np.dtype(np.float64))
    params = [np.zeros(2), np.zeros((1, 2))]
    out = [np.empty(2), np.empty((1, 2))]
    first = optimizer.tell(3.0, _grads(), state, params, hp, out)
    # The opening evaluation never ends a step that goes on to a line search.
    assert first.evaluate and not first.completed
    assert state.phase == LS_BRACKET and state.func_evals == 1
    # A gradient already below tolerance_grad ends the step on the spot: no move.
    fresh = optimizer.init([(2,), (1, 2)], hp, np.dtype(np.float64))
    done = optimizer.tell(3.0, _grads(0.0), fresh, params, hp, out)
    assert done.completed and not done.evaluate
    assert all(not o.any() for o in out)
    assert fresh.phase == START and fresh.n_iter == 0 and fresh.func_evals == 1


def test_ask_tell_and_needs_params() -> None:
    assert optimizer.ask_tell(optimizer.resolve({}))
    assert not optimizer.ask_tell(optimizer.resolve({"max_iter": 1}))
    assert optimizer.ask_tell(optimizer.resolve({"max_iter": 1, "line_search_fn": "strong_wolfe"}))
    assert optimizer.needs_params(optimizer.resolve({"line_search_fn": "strong_wolfe"}))
    assert not optimizer.needs_params(optimizer.resolve({"max_iter": 3}))


def test_tell_needs_a_loss_when_it_asks_for_points() -> None:
    hp = optimizer.resolve({"max_iter": 3})
    state = optimizer.init([(2,), (1, 2)], hp, np.dtype(np.float64))
    out = [np.empty(2), np.empty((1, 2))]
    with pytest.raises(InvalidInput) as err:
        optimizer.tell(None, _grads(), state, None, hp, out)
    assert err.value.field == "loss"
    assert state.func_evals == 0


def test_line_search_needs_parameter_values() -> None:
    hp = optimizer.resolve({"line_search_fn": "strong_wolfe"})
    state = optimizer.init([(2,), (1, 2)], hp, np.dtype(np.float64))
    out = [np.empty(2), np.empty((1, 2))]
    with pytest.raises(InvalidInput) as err:
        optimizer.tell(1.0, _grads(), state, None, hp, out)
    assert err.value.field == "params"


def test_update_refuses_configurations_that_ask_for_points() -> None:
    hp = optimizer.resolve({"max_iter": 4})
    state = optimizer.init([(2,)], hp, np.dtype(np.float64))
    with pytest.raises(RuntimeError, match="tell"):
        optimizer.update([np.ones(2)], state, None, hp, [np.empty(2)])


def _mid_zoom_state() -> tuple[LBFGSState, dict[str, Any]]:
    run = OptserveRun(SCENARIOS["rosenbrock-wolfe"])
    found: list[LBFGSState] = []

    def grab(r: OptserveRun) -> None:
        if r.state.phase == LS_ZOOM and r.state.old_dirs and not found:
            found.append(round_trip(r.state))

    run.run(observe=grab)
    return found[0], run.hp


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("phase", "elsewhere", "phase 'elsewhere'"),
        ("phase", FIXED, "does not fit"),
        ("ls_iter", -1, "non-negative integer"),
        ("t", "soon", "not a number"),
        ("bracket", [0.0, 0.5, 1.0], "two-point bracket"),
        ("x", None, "x missing"),
        ("d", np.zeros(5), "flat float64 vectors of 2"),
        ("old_stps", [], "history lists"),
    ],
)
def test_a_forged_state_is_refused_before_anything_changes(
    field: str, value: Any, why: str
) -> None:
    state, hp = _mid_zoom_state()
    setattr(state, field, value)
    before_arrays, before_scalars = to_flat(state)
    params = [np.zeros(1), np.zeros(1)]
    out = [np.empty(1), np.empty(1)]
    with pytest.raises(InvalidInput, match=re.escape(why)) as err:
        optimizer.tell(1.0, [np.ones(1), np.ones(1)], state, params, hp, out)
    assert err.value.field == "state"
    after_arrays, after_scalars = to_flat(state)
    assert after_scalars == before_scalars
    assert after_arrays.keys() == before_arrays.keys()


def test_cubic_interpolation_matches_torchs_and_never_raises() -> None:
    # Two equal abscissas: the secant slope is nan (torch raises ZeroDivisionError when
    # both are Python floats, and gives nan for tensors); the midpoint of the bounds wins.
    midpoint = _cubic_interpolate(0.0, 1.0, -1.0, 0.0, 1.0, -1.0, bounds=(0.0, 2.0))
    assert midpoint == 1.0
    if HAVE_TORCH:
        import torch
        from torch.optim.lbfgs import _cubic_interpolate as torch_cubic

        for args in [
            (0.0, 1.0, -2.0, 1.0, 0.5, 0.3),
            (1.0, 0.5, 0.3, 0.0, 1.0, -2.0),
            (0.0, 1.0, -1.0, 2.0, 3.0, 4.0),
        ]:
            x1, f1, g1, x2, f2, g2 = args
            theirs = torch_cubic(
                x1,
                f1,
                torch.tensor(g1, dtype=torch.float64),
                x2,
                f2,
                torch.tensor(g2, dtype=torch.float64),
            )
            assert _cubic_interpolate(*args) == float(theirs)


# ---- hyperparameters ----------------------------------------------------------------


def test_defaults_are_torchs() -> None:
    hp = optimizer.resolve({})
    assert hp == {
        "lr": 1.0,
        "max_iter": 20,
        "max_eval": 25,
        "tolerance_grad": 1e-7,
        "tolerance_change": 1e-9,
        "history_size": 100,
        "line_search_fn": None,
    }
    if HAVE_TORCH:
        import torch

        for given in ({}, {"max_iter": 7}, {"max_iter": 3, "max_eval": 11, "lr": 0.5}):
            theirs = torch.optim.LBFGS([torch.zeros(1)], **given).defaults
            assert optimizer.resolve(given) == theirs


def test_max_eval_follows_max_iter_unless_given() -> None:
    for max_iter in (1, 4, 7, 20):
        assert optimizer.resolve({"max_iter": max_iter})["max_eval"] == max_iter * 5 // 4
    assert optimizer.resolve({"max_iter": 4, "max_eval": 9})["max_eval"] == 9


def test_resolved_config_resolves_to_itself() -> None:
    hp = optimizer.resolve({"max_iter": 6, "line_search_fn": "strong_wolfe"})
    assert optimizer.resolve(hp) == hp


@pytest.mark.parametrize(
    ("given", "argument", "message"),
    [
        ({"lr": -0.5}, "lr", "Invalid learning rate: -0.5"),
        ({"line_search_fn": "backtracking"}, "line_search_fn", "only 'strong_wolfe' is supported"),
        ({"max_iter": 0}, "max_iter", "Invalid max_iter value: 0"),
        ({"max_eval": 0}, "max_eval", "Invalid max_eval value: 0"),
        ({"history_size": -3}, "history_size", "Invalid history_size value: -3"),
        ({"max_iter": 2.5}, "max_iter", "must be an integer"),
        ({"momentum": 0.9}, "momentum", "unknown argument"),
    ],
)
def test_invalid_hyperparameters_name_argument_and_value(
    given: dict[str, Any], argument: str, message: str
) -> None:
    with pytest.raises(InvalidHyperparameter, match=re.escape(message)) as err:
        optimizer.resolve(given, where="optimizer.")
    assert err.value.argument == f"optimizer.{argument}"
    assert err.value.value == next(iter(given.values()))


def test_catalog_entry_lists_every_argument() -> None:
    entry = optimizer.describe()
    assert entry["name"] == "LBFGS"
    names = [a["name"] for a in entry["args"]]
    assert names == [
        "lr",
        "max_iter",
        "max_eval",
        "tolerance_grad",
        "tolerance_change",
        "history_size",
        "line_search_fn",
    ]
    by_name = {a["name"]: a for a in entry["args"]}
    assert by_name["max_eval"]["nullable"] and by_name["max_eval"]["default"] is None
    assert by_name["line_search_fn"]["choices"] == ["strong_wolfe"]


# ---- through a training session -----------------------------------------------------


def _session_config(scenario: Scenario) -> dict[str, Any]:
    names = [f"t{i}" for i in range(len(scenario.shapes))]
    return {
        "optimizer": {"name": "lbfgs", **scenario.hp},
        "params": {n: {"shape": list(s)} for n, s in zip(names, scenario.shapes, strict=True)},
        "dtype": scenario.dtype,
    }


def test_a_session_checkpointed_at_every_tell_asks_for_torchs_points() -> None:
    """plan -> apply_step -> state_to_flat/state_from_flat, as the service drives it."""
    from service.core import training
    from service.core.plan import plan_from_config

    scenario = SCENARIOS["rosenbrock-wolfe"]
    plan = plan_from_config(_session_config(scenario))
    assert plan.ask_tell and plan.needs_params
    state = training.initial_state(plan)
    run = OptserveRun(scenario)  # for its parameters and objective
    points: list[np.ndarray] = []
    for step in range(scenario.steps):
        while True:
            points.append(np.concatenate([p.ravel() for p in run.params]))
            loss, grads = run.evaluate(step)
            out = [np.empty_like(p) for p in run.params]
            outcome = training.apply_step(plan, state, grads, run.params, out, loss=loss)
            arrays, meta = training.state_to_flat(plan, state)
            state = training.state_from_flat(plan, arrays, json.loads(json.dumps(meta)))
            for p, o in zip(run.params, out, strict=True):
                p += o
            assert outcome.applied and outcome.evaluate is not outcome.completed
            if outcome.completed:
                break
        assert state.step == step + 1
    expected = reference(scenario)
    np.testing.assert_allclose(np.array(points), np.array(expected.points), rtol=0, atol=POINT_ATOL)


def test_a_session_rejects_param_groups() -> None:
    from service.core.plan import plan_from_config

    config = _session_config(SCENARIOS["quadratic-wolfe"])
    config["param_groups"] = [{"params": ["t1"], "lr": 0.1}]
    with pytest.raises(InvalidHyperparameter, match="parameter groups") as err:
        plan_from_config(config)
    assert err.value.argument == "param_groups"


@pytest.mark.parametrize("scenario", PLATEAU, ids=ids(PLATEAU))
def test_plateau_schedule_sees_the_loss_step_returns(scenario: Scenario) -> None:
    """A step-interval ReduceLROnPlateau gets the loss of a step's first evaluation.

    torch's idiom is ``scheduler.step(optimizer.step(closure))``, and ``step()`` returns
    the loss of its first closure call, not of the last one.
    """
    from service.core import training
    from service.core.plan import plan_from_config

    assert scenario.plateau is not None
    config = _session_config(scenario)
    config["schedule"] = {"name": "ReduceLROnPlateau", **scenario.plateau}
    plan = plan_from_config(config)
    state = training.initial_state(plan)
    run = OptserveRun(scenario)  # for its parameters and objective
    points: list[np.ndarray] = []
    lrs: list[float] = []
    for step in range(scenario.steps):
        while True:
            points.append(np.concatenate([p.ravel() for p in run.params]))
            loss, grads = run.evaluate(step)
            out = [np.empty_like(p) for p in run.params]
            outcome = training.apply_step(plan, state, grads, run.params, out, loss=loss)
            for p, o in zip(run.params, out, strict=True):
                p += o
            if outcome.completed:
                break
        lrs.append(training.current_lrs(state)[0])
    expected = reference(scenario)
    assert len(set(expected.lrs)) > 2, "the schedule cuts the lr more than once"
    assert lrs == expected.lrs
    assert len(points) == len(expected.points)
    np.testing.assert_allclose(np.array(points), np.array(expected.points), rtol=0, atol=POINT_ATOL)

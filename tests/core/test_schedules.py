"""Every schedule against torch.optim.lr_scheduler: lr, momentum and beta1 sequences, exactly.

The sequences run against live torch when it is importable and against the committed
fixtures (``python -m tests.core.make_schedule_fixtures``) otherwise. Validation errors
are compared with torch's own where torch raises one at construction; where torch only
fails later (a division by zero mid-training), optserve refuses the config up front and
the test shows torch failing.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from service.core import schedules, training
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.plan import plan_from_config
from service.core.schedules.base import Schedule
from tests.core import make_schedule_fixtures as fixtures
from tests.core.schedule_sequences import (
    SEQUENCES,
    Sequence,
    expand,
    initial_groups,
    metric_at,
    run_optserve,
    run_torch,
    torch_optimizer,
)

HAVE_TORCH = importlib.util.find_spec("torch") is not None
SEQUENCE_IDS = [seq.id for seq in SEQUENCES]

TORCH_SCHEDULES = {
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "OneCycleLR",
    "SequentialLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
}


def _reference(seq: Sequence) -> dict[str, list[list[Any]]]:
    if HAVE_TORCH:
        return run_torch(seq)
    stored = fixtures.load(seq)
    assert stored["sequence"] == seq.describe(), (
        f"stale fixture: python -m tests.core.make_schedule_fixtures {seq.id}"
    )
    return expand(stored["trace"], seq.steps)


def _first_difference(got: dict[str, Any], expected: dict[str, Any]) -> str:
    if set(got) != set(expected):
        return f"traced keys differ: {sorted(got)} != {sorted(expected)}"
    for key, columns in expected.items():
        for gi, (mine, theirs) in enumerate(zip(got[key], columns, strict=True)):
            for step, (a, b) in enumerate(zip(mine, theirs, strict=True)):
                if a != b:
                    return f"{key} of group {gi} after step {step}: {a!r} != torch's {b!r}"
    return "no difference"


@pytest.mark.parametrize("json_round_trip", [False, True], ids=["in-memory", "json-each-step"])
@pytest.mark.parametrize("seq", SEQUENCES, ids=SEQUENCE_IDS)
def test_sequence_matches_torch_exactly(seq: Sequence, json_round_trip: bool) -> None:
    expected = _reference(seq)
    got = run_optserve(seq, json_round_trip)
    assert got == expected, _first_difference(got, expected)


@pytest.mark.parametrize("seq", SEQUENCES, ids=SEQUENCE_IDS)
def test_resume_from_json_midway_continues_exactly(seq: Sequence) -> None:
    """Serialize state and groups half way, rebuild the config from its resolved JSON form
    (as a restored checkpoint does) and continue: the rest equals an uninterrupted run."""
    schedule = schedules.get(seq.schedule["name"])
    given = {k: v for k, v in seq.schedule.items() if k != "name"}
    config = schedule.resolve(given)
    groups = initial_groups(seq)
    state = schedule.start(config, groups)
    twin_groups = copy.deepcopy(groups)
    twin_state = copy.deepcopy(state)
    half = seq.steps // 2
    for step in range(1, seq.steps + 1):
        metric = metric_at(step) if seq.metrics else None
        if step == half:
            saved = json.dumps(
                {"config": config, "state": twin_state, "groups": twin_groups}, allow_nan=False
            )
            restored = json.loads(saved)
            twin_config = schedule.resolve(restored["config"])
            assert twin_config == config
            twin_state, twin_groups = restored["state"], restored["groups"]
        state = schedule.step(config, state, groups, metric)
        twin_state = schedule.step(
            config if step < half else twin_config, twin_state, twin_groups, metric
        )
        assert [g["lr"] for g in twin_groups] == [g["lr"] for g in groups], f"step {step}"
        assert json.dumps(twin_state) == json.dumps(state), f"step {step}"


@pytest.mark.skipif(not HAVE_TORCH, reason="checks the committed fixtures against live torch")
@pytest.mark.parametrize("seq", SEQUENCES, ids=SEQUENCE_IDS)
def test_fixture_is_current(seq: Sequence) -> None:
    path = fixtures.fixture_path(seq)
    assert path.exists(), f"python -m tests.core.make_schedule_fixtures {seq.id}"
    stored = fixtures.load(seq)
    assert stored["sequence"] == seq.describe()
    assert expand(stored["trace"], seq.steps) == run_torch(seq)


SWA_SCHEDULES = {"SWALR"}
"""``torch.optim.swa_utils``' schedules: checked against live torch, alone and inside
SequentialLR, by tests/api/test_averaging.py (with averaged weights) and below."""


def test_every_torch_schedule_is_covered() -> None:
    names = {s.name for s in schedules.all_schedules()}
    assert names == TORCH_SCHEDULES | SWA_SCHEDULES
    covered = set()
    for seq in SEQUENCES:
        stack = [seq.schedule]
        while stack:
            config = stack.pop()
            covered.add(config["name"])
            stack.extend(config.get("schedulers", []))
    assert covered == TORCH_SCHEDULES
    assert len(set(SEQUENCE_IDS)) == len(SEQUENCE_IDS)


def test_names_are_case_insensitive() -> None:
    assert schedules.get("cosineannealinglr") is schedules.get("CosineAnnealingLR")


@pytest.mark.skipif(not HAVE_TORCH, reason="reads torch's constructor signatures")
@pytest.mark.parametrize("schedule", schedules.all_schedules(), ids=lambda s: s.name)
def test_arguments_are_torchs(schedule: Schedule) -> None:
    """Names, order and defaults of every argument equal torch's constructor's."""
    import torch

    module = torch.optim.swa_utils if schedule.name in SWA_SCHEDULES else torch.optim.lr_scheduler
    torch_cls = getattr(module, schedule.name)
    params = inspect.signature(torch_cls.__init__).parameters
    # Python callables cannot travel over HTTP; the optimizer is the session's.
    theirs = [p for n, p in params.items() if n not in ("self", "optimizer", "scale_fn")]
    assert [a.name for a in schedule.args] == [p.name for p in theirs]
    for arg, param in zip(schedule.args, theirs, strict=True):
        if param.default is inspect.Parameter.empty:
            assert arg.required, arg.name
        else:
            assert not arg.required and arg.default == param.default, arg.name
    json.dumps(schedule.describe(), allow_nan=False)


@dataclass(frozen=True)
class Invalid:
    id: str
    schedule: dict[str, Any]
    field: str
    message: str
    torch: str
    """``"same"``: torch's constructor raises this message; ``"later"``: torch accepts the
    config and fails while stepping; ``"other"``: torch fails another way (types, names)."""
    optimizer: str = "SGD"
    lrs: tuple[float, ...] = (0.1, 0.03)


def _seq(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, **args}


INVALID = [
    Invalid("missing-required", _seq("StepLR"), "step_size", "missing required", "other"),
    Invalid("unknown-argument", _seq("StepLR", step_size=3, gama=0.5), "gama", "unknown", "other"),
    Invalid("wrong-type", _seq("StepLR", step_size="3"), "step_size", "integer", "other"),
    Invalid(
        "steplr-zero-step", _seq("StepLR", step_size=0), "step_size", "positive integer", "later"
    ),
    Invalid(
        "constantlr-factor",
        _seq("ConstantLR", factor=1.5),
        "factor",
        "Constant multiplicative factor expected to be between 0 and 1.",
        "same",
    ),
    Invalid(
        "constantlr-factor-zero", _seq("ConstantLR", factor=0.0), "factor", "factor 0", "later"
    ),
    Invalid(
        "linearlr-start",
        _seq("LinearLR", start_factor=0.0),
        "start_factor",
        "Starting multiplicative factor expected to be greater than 0 and less or equal to 1.",
        "same",
    ),
    Invalid(
        "linearlr-end",
        _seq("LinearLR", end_factor=1.5),
        "end_factor",
        "Ending multiplicative factor expected to be between 0 and 1.",
        "same",
    ),
    Invalid(
        "polynomiallr-negative-power",
        _seq("PolynomialLR", total_iters=4, power=-1.0),
        "power",
        "non-negative",
        "later",
    ),
    Invalid("cosine-zero-tmax", _seq("CosineAnnealingLR", T_max=0), "T_max", "positive", "later"),
    Invalid(
        "warmrestarts-t0",
        _seq("CosineAnnealingWarmRestarts", T_0=0),
        "T_0",
        "Expected positive integer T_0, but got 0",
        "same",
    ),
    Invalid(
        "warmrestarts-tmult",
        _seq("CosineAnnealingWarmRestarts", T_0=5, T_mult=0),
        "T_mult",
        "Expected integer T_mult >= 1, but got 0",
        "same",
    ),
    Invalid(
        "cyclic-mode",
        _seq("CyclicLR", base_lr=0.01, max_lr=0.1, mode="sawtooth"),
        "mode",
        "mode is invalid and scale_fn is None",
        "same",
    ),
    Invalid(
        "cyclic-base-lr-per-group",
        _seq("CyclicLR", base_lr=[0.01, 0.02, 0.03], max_lr=0.1),
        "base_lr",
        "base_lr must have the same length as optimizer.param_groups. "
        "base_lr has 3 values, param_groups has 2.",
        "same",
    ),
    Invalid(
        "cyclic-no-momentum",
        _seq("CyclicLR", base_lr=0.01, max_lr=0.1),
        "cycle_momentum",
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled",
        "same",
        optimizer="Adagrad",
    ),
    Invalid(
        "cyclic-zero-step",
        _seq("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=0),
        "step_size_up",
        "positive integer",
        "later",
    ),
    Invalid(
        "cyclic-not-a-number",
        _seq("CyclicLR", base_lr="fast", max_lr=0.1),
        "base_lr",
        "a number or a list of numbers",
        "other",
    ),
    Invalid(
        "onecycle-no-length",
        _seq("OneCycleLR", max_lr=0.1),
        "total_steps",
        "You must define either total_steps OR (epochs AND steps_per_epoch)",
        "same",
    ),
    Invalid(
        "onecycle-total-steps",
        _seq("OneCycleLR", max_lr=0.1, total_steps=0),
        "total_steps",
        "Expected positive integer total_steps, but got 0",
        "same",
    ),
    Invalid(
        "onecycle-epochs",
        _seq("OneCycleLR", max_lr=0.1, epochs=-1, steps_per_epoch=10),
        "epochs",
        "Expected positive integer epochs, but got -1",
        "same",
    ),
    Invalid(
        "onecycle-steps-per-epoch",
        _seq("OneCycleLR", max_lr=0.1, epochs=3, steps_per_epoch=0),
        "steps_per_epoch",
        "Expected positive integer steps_per_epoch, but got 0",
        "same",
    ),
    Invalid(
        "onecycle-pct-start",
        _seq("OneCycleLR", max_lr=0.1, total_steps=100, pct_start=1.5),
        "pct_start",
        "Expected float between 0 and 1 pct_start, but got 1.5",
        "same",
    ),
    Invalid(
        "onecycle-anneal",
        _seq("OneCycleLR", max_lr=0.1, total_steps=100, anneal_strategy="cosine"),
        "anneal_strategy",
        "anneal_strategy must be one of 'cos' or 'linear', instead got cosine",
        "same",
    ),
    Invalid(
        "onecycle-momentum-per-group",
        _seq("OneCycleLR", max_lr=0.1, total_steps=100, max_momentum=[0.9]),
        "max_momentum",
        "max_momentum must have the same length as optimizer.param_groups. "
        "max_momentum has 1 values, param_groups has 2.",
        "same",
    ),
    Invalid(
        "onecycle-no-beta1",
        _seq("OneCycleLR", max_lr=0.1, total_steps=100),
        "cycle_momentum",
        "optimizer must support momentum or beta1 with `cycle_momentum` option enabled",
        "same",
        optimizer="Adagrad",
    ),
    Invalid(
        "onecycle-empty-phase",
        _seq("OneCycleLR", max_lr=0.1, total_steps=10, pct_start=0.1),
        "pct_start",
        "zero length",
        "later",
    ),
    Invalid(
        "plateau-factor",
        _seq("ReduceLROnPlateau", factor=1.0),
        "factor",
        "Factor should be < 1.0.",
        "same",
    ),
    Invalid(
        "plateau-mode",
        _seq("ReduceLROnPlateau", mode="median"),
        "mode",
        "mode median is unknown!",
        "same",
    ),
    Invalid(
        "plateau-threshold-mode",
        _seq("ReduceLROnPlateau", threshold_mode="pct"),
        "threshold_mode",
        "threshold mode pct is unknown!",
        "same",
    ),
    Invalid(
        "plateau-min-lrs",
        _seq("ReduceLROnPlateau", min_lr=[0.1, 0.2, 0.3]),
        "min_lr",
        "expected 2 min_lrs, got 3",
        "same",
    ),
    Invalid(
        "resume-without-initial-lr",
        _seq("StepLR", step_size=3, last_epoch=4),
        "last_epoch",
        "param 'initial_lr' is not specified in param_groups[0] when resuming scheduler "
        "with last_epoch >= 0.",
        "same",
    ),
    Invalid(
        "sequential-empty",
        _seq("SequentialLR", schedulers=[], milestones=[]),
        "schedulers",
        "SequentialLR expects at least one scheduler, but got no scheduler.",
        "same",
    ),
    Invalid(
        "sequential-milestones",
        _seq(
            "SequentialLR",
            schedulers=[_seq("ExponentialLR", gamma=0.9), _seq("StepLR", step_size=2)],
            milestones=[3, 6],
        ),
        "milestones",
        "Sequential Schedulers expects number of schedulers provided to be one more than the "
        "number of milestone points, but got number of schedulers 2 and the number of "
        "milestones to be equal to 2",
        "same",
    ),
    Invalid(
        "sequential-plateau",
        _seq(
            "SequentialLR",
            schedulers=[_seq("ExponentialLR", gamma=0.9), _seq("ReduceLROnPlateau")],
            milestones=[3],
        ),
        "schedulers[1].name",
        "SequentialLR does not support `ReduceLROnPlateau` scheduler as it requires additional "
        "kwargs to be specified when calling `step`, but got one at index 1 in the given "
        "schedulers sequence.",
        "same",
    ),
    Invalid(
        "sequential-nested-field",
        _seq(
            "SequentialLR",
            schedulers=[_seq("ConstantLR"), _seq("ExponentialLR", gamma="fast")],
            milestones=[3],
        ),
        "schedulers[1].gamma",
        "must be a number",
        "other",
    ),
    Invalid(
        "sequential-unknown-name",
        _seq("SequentialLR", schedulers=[_seq("WarmupLR")], milestones=[]),
        "schedulers[0].name",
        "unknown schedule 'WarmupLR'",
        "other",
    ),
    Invalid(
        "sequential-composite-after-milestone",
        _seq(
            "SequentialLR",
            schedulers=[
                _seq("ConstantLR"),
                _seq("ChainedScheduler", schedulers=[_seq("ExponentialLR", gamma=0.9)]),
            ],
            milestones=[3],
        ),
        "schedulers[1].name",
        "cannot switch to a ChainedScheduler",
        "later",
    ),
    Invalid(
        "sequential-zero-total-iters",
        _seq(
            "SequentialLR",
            schedulers=[_seq("ConstantLR"), _seq("LinearLR", total_iters=0)],
            milestones=[3],
        ),
        "schedulers[1].total_iters",
        "must not be 0",
        "later",
    ),
    Invalid(
        "sequential-deep-group-check",
        _seq(
            "SequentialLR",
            schedulers=[
                _seq("ConstantLR"),
                _seq("CyclicLR", base_lr=[0.1], max_lr=0.5),
            ],
            milestones=[3],
        ),
        "schedulers[1].base_lr",
        "base_lr must have the same length as optimizer.param_groups.",
        "same",
    ),
    Invalid(
        "chained-empty",
        _seq("ChainedScheduler", schedulers=[]),
        "schedulers",
        "ChainedScheduler expects at least one scheduler to be chained, but got no scheduler.",
        "same",
    ),
    Invalid(
        "chained-plateau",
        _seq("ChainedScheduler", schedulers=[_seq("ReduceLROnPlateau", factor=0.5)]),
        "schedulers[0].name",
        "ChainedScheduler does not support `ReduceLROnPlateau` scheduler",
        "same",
    ),
    Invalid(
        "chained-not-a-list",
        _seq("ChainedScheduler", schedulers={"name": "StepLR"}),
        "schedulers",
        "must be a list",
        "other",
    ),
]


def _resolve_and_bind(case: Invalid) -> None:
    schedule = schedules.get(case.schedule["name"])
    given = {k: v for k, v in case.schedule.items() if k != "name"}
    config = schedule.resolve(given, where="schedule.")
    groups = initial_groups(Sequence(case.id, case.schedule, case.optimizer, case.lrs))
    before = copy.deepcopy(groups)
    try:
        schedule.validate_groups(config, groups, where="schedule.")
    finally:
        assert groups == before, "validate_groups must not change the groups"


@pytest.mark.parametrize("case", INVALID, ids=[c.id for c in INVALID])
def test_invalid_config_names_field_and_value(case: Invalid) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        _resolve_and_bind(case)
    assert info.value.argument == f"schedule.{case.field}"
    assert case.message in str(info.value)


@pytest.mark.skipif(not HAVE_TORCH, reason="compares with torch's own errors")
@pytest.mark.parametrize("case", [c for c in INVALID if c.torch != "other"], ids=lambda c: c.id)
def test_torch_rejects_the_same_configs(case: Invalid) -> None:
    import torch

    from tests.core.torch_reference import build_scheduler

    seq = Sequence(case.id, case.schedule, case.optimizer, case.lrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer = torch_optimizer(seq)
        if case.torch == "same":
            with pytest.raises((ValueError, KeyError)) as info:
                build_scheduler(torch, optimizer, case.schedule)
            assert case.message in str(info.value)
            return
        with pytest.raises((ArithmeticError, NotImplementedError)):
            scheduler = build_scheduler(torch, optimizer, case.schedule)
            for _ in range(50):
                optimizer.step()
                scheduler.step()


def test_group_errors_also_raise_from_start() -> None:
    schedule = schedules.get("CyclicLR")
    config = schedule.resolve({"base_lr": [0.1, 0.2, 0.3], "max_lr": 1.0})
    with pytest.raises(InvalidHyperparameter, match="base_lr must have the same length"):
        schedule.start(config, [{"lr": 0.1, "momentum": 0.0}])


def test_nesting_depth_is_bounded() -> None:
    config: dict[str, Any] = {"name": "ExponentialLR", "gamma": 0.9}
    for _ in range(20):
        config = {"name": "ChainedScheduler", "schedulers": [config]}
    schedule = schedules.get("ChainedScheduler")
    with pytest.raises(InvalidHyperparameter, match="nested at most"):
        schedule.resolve({"schedulers": config["schedulers"]}, where="schedule.")


def _one_cycle(total_steps: int) -> tuple[Schedule, dict[str, Any], dict[str, Any], list[Any]]:
    schedule = schedules.get("OneCycleLR")
    config = schedule.resolve({"max_lr": 0.1, "total_steps": total_steps})
    groups: list[dict[str, Any]] = [{"lr": 0.01, "momentum": 0.9}]
    return schedule, config, schedule.start(config, groups), groups


def test_one_cycle_past_total_steps_is_refused_before_anything_changes() -> None:
    schedule, config, state, groups = _one_cycle(10)
    for _ in range(10):
        schedule.check_step(config, state, groups)
        state = schedule.step(config, state, groups)
    before = (copy.deepcopy(state), copy.deepcopy(groups))
    message = "Tried to step 11 times. The specified number of total steps is 10"
    with pytest.raises(InvalidInput, match=message):
        schedule.check_step(config, state, groups)
    assert (state, groups) == before
    with pytest.raises(InvalidInput, match=message):
        schedule.step(config, state, groups)


@pytest.mark.skipif(not HAVE_TORCH, reason="compares with torch's own error")
def test_torch_refuses_the_same_one_cycle_step() -> None:
    import torch

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    optimizer.step()
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        scheduler.step()


def test_plateau_needs_a_metric() -> None:
    schedule = schedules.get("ReduceLROnPlateau")
    config = schedule.resolve({})
    groups: list[dict[str, Any]] = [{"lr": 0.1}]
    state = schedule.start(config, groups)
    assert schedule.needs_metric
    with pytest.raises(InvalidInput, match="needs a metric"):
        schedule.check_step(config, state, groups, None)
    schedule.check_step(config, state, groups, 0.5)
    assert json.loads(json.dumps(state, allow_nan=False))["best"] == "inf"


def test_arithmetic_overflow_is_a_client_error() -> None:
    """torch raises OverflowError once gamma ** iterations leaves the float range; optserve
    refuses that step instead of failing as a server fault."""
    schedule = schedules.get("CyclicLR")
    config = schedule.resolve(
        {"base_lr": 0.1, "max_lr": 0.2, "mode": "exp_range", "gamma": 1e10, "step_size_up": 100}
    )
    groups: list[dict[str, Any]] = [{"lr": 0.1, "momentum": 0.9}]
    state = schedule.start(config, groups)
    with pytest.raises(InvalidInput, match="cannot be computed"):
        for _ in range(40):
            state = schedule.step(config, state, groups)


def test_cyclic_momentum_keeps_beta2_and_container() -> None:
    schedule = schedules.get("CyclicLR")
    config = schedule.resolve({"base_lr": 0.001, "max_lr": 0.01, "step_size_up": 4})
    groups: list[dict[str, Any]] = [
        {"lr": 0.1, "betas": (0.9, 0.99)},
        {"lr": 0.2, "betas": [0.8, 0.9]},
    ]
    state = schedule.start(config, groups)
    schedule.step(config, state, groups)
    assert isinstance(groups[0]["betas"], tuple) and groups[0]["betas"][1] == 0.99
    assert isinstance(groups[1]["betas"], list) and groups[1]["betas"][1] == 0.9
    assert groups[0]["betas"][0] < 0.9


def _session(schedule: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    return {"optimizer": optimizer, "schedule": schedule, "params": {"w": {"shape": [3]}}}


def test_session_config_checks_schedule_against_groups() -> None:
    from service.core.plan import plan_from_config

    config = _session(
        {"name": "CyclicLR", "base_lr": 0.01, "max_lr": 0.1}, {"name": "Adagrad", "lr": 0.1}
    )
    with pytest.raises(InvalidHyperparameter, match="must support momentum or beta1") as info:
        plan_from_config(config)
    assert info.value.argument == "schedule.cycle_momentum"


def test_session_refuses_a_step_the_schedule_cannot_take_and_changes_nothing() -> None:
    import numpy as np

    from service.core.plan import plan_from_config
    from service.core.training import apply_step, initial_state, state_to_flat

    config = _session(
        {"name": "OneCycleLR", "max_lr": 0.1, "total_steps": 3},
        {"name": "SGD", "lr": 0.1, "momentum": 0.9},
    )
    plan = plan_from_config(config)
    state = initial_state(plan)
    out = [np.zeros(3, dtype=np.float32)]
    # torch's scheduler.step() after optimizer step total_steps + 1 raises; optserve refuses
    # that optimizer step instead of half applying it.
    for _ in range(3):
        apply_step(plan, state, [np.ones(3, dtype=np.float32)], None, out)
    arrays, meta = state_to_flat(plan, state)
    before = ({k: v.copy() for k, v in arrays.items()}, json.dumps(meta))
    with pytest.raises(InvalidInput, match="Tried to step 4 times"):
        apply_step(plan, state, [np.ones(3, dtype=np.float32)], None, out)
    arrays, meta = state_to_flat(plan, state)
    assert json.dumps(meta) == before[1]
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, before[0][name])


@pytest.mark.skipif(not HAVE_TORCH, reason="compares with live torch")
@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "SWALR", "swa_lr": 0.05, "anneal_epochs": 5},
        {"name": "SWALR", "swa_lr": [0.05, 0.01], "anneal_epochs": 3, "anneal_strategy": "linear"},
        {"name": "SWALR", "swa_lr": 0.05, "anneal_epochs": 0},
        {
            "name": "ChainedScheduler",
            "schedulers": [
                {"name": "SWALR", "swa_lr": 0.02, "anneal_epochs": 4},
                {"name": "ExponentialLR", "gamma": 0.9},
            ],
        },
    ],
    ids=["cos", "linear-per-group", "no-anneal", "chained"],
)
def test_swalr_previews_torch_bit_for_bit(schedule: dict[str, Any]) -> None:
    import torch
    from torch.optim import lr_scheduler, swa_utils

    config = {
        "optimizer": {"name": "SGD", "lr": 0.1},
        "params": {"a": {"shape": [2]}, "b": {"shape": [1]}},
        "param_groups": [{"params": ["b"], "lr": 0.3}],
        "schedule": schedule,
    }
    ours = training.preview(plan_from_config(config), 30)
    opt = torch.optim.SGD(
        [{"params": [torch.zeros(2, requires_grad=True)]},
         {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.3}],
        lr=0.1,
    )  # fmt: skip

    def build(spec: dict[str, Any]) -> Any:
        args = {k: v for k, v in spec.items() if k != "name"}
        if spec["name"] == "SWALR":
            return swa_utils.SWALR(opt, **args)
        if spec["name"] == "ChainedScheduler":
            return lr_scheduler.ChainedScheduler([build(s) for s in args["schedulers"]])
        return getattr(lr_scheduler, spec["name"])(opt, **args)

    sched = build(schedule)
    theirs = []
    for _ in range(30):
        theirs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert ours == theirs

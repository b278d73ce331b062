"""Schedules on param groups added (``add_param_group``) or edited by hand, against torch.

Every schedule runs with non-default arguments while groups are appended at various
points (before the first step, mid-run, next to a SequentialLR milestone, inside a
CyclicLR or OneCycleLR momentum cycle) and while group 0's (or another's) lr, momentum or
betas are edited; the lr, momentum and beta1 of every group after every step must equal
torch's exactly. Where torch raises, optserve must refuse: the added group up front when
torch raises at the schedule's next step (ReduceLROnPlateau with per-group ``min_lr``: at
its next reduction), otherwise the very step torch raises at; a refusal changes nothing.

The scenarios run against live torch when it is importable (tests marked ``torch``) and
against the committed fixtures (``python -m tests.core.make_group_change_fixtures``)
always.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tests.core import make_group_change_fixtures as fixtures
from tests.core.group_change_scenarios import SCENARIOS, Scenario, run_optserve, run_torch
from tests.core.test_schedules import TORCH_SCHEDULES

HAVE_TORCH = importlib.util.find_spec("torch") is not None
IDS = [sc.id for sc in SCENARIOS]


def _stored(sc: Scenario) -> dict[str, Any]:
    stored = fixtures.load(sc)
    assert stored["scenario"] == sc.describe(), (
        f"stale fixture: python -m tests.core.make_group_change_fixtures {sc.id}"
    )
    outcome: dict[str, Any] = stored["outcome"]
    return outcome


def _first_difference(mine: list[Any], theirs: list[Any]) -> str:
    for step, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            return f"after step {step}: {a} != torch's {b}"
    return f"{len(mine)} snapshots != torch's {len(theirs)}"


def assert_same_outcome(sc: Scenario, mine: dict[str, Any], torch: dict[str, Any]) -> None:
    raised, refused = torch["raised"], mine["refused"]
    snapshots = torch["snapshots"]
    if refused is None:
        assert raised is None, f"torch raises at step {raised['step']}: {raised['error']}"
    elif refused["what"] == "step":
        assert raised is not None, f"optserve refused step {refused['at']}; torch does not"
        assert raised["step"] == refused["at"], f"torch raises at step {raised['step']}"
    else:
        at = refused["at"]
        assert refused["what"] == "add", f"an edit was refused: {refused['message']}"
        assert raised is not None, f"optserve refused the group added after {at} steps"
        if sc.schedule["name"] == "ReduceLROnPlateau":
            assert raised["step"] > at  # at its next reduction
        else:
            assert raised["step"] == at + 1, f"torch raises only at step {raised['step']}"
        snapshots = snapshots[: at + 1]
    assert mine["snapshots"] == snapshots, _first_difference(mine["snapshots"], snapshots)


@pytest.mark.parametrize("json_round_trip", [False, True], ids=["in-memory", "json-each-step"])
@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_matches_the_committed_torch_outcome(sc: Scenario, json_round_trip: bool) -> None:
    assert_same_outcome(sc, run_optserve(sc, json_round_trip), _stored(sc))


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="runs torch's schedulers")
@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_matches_live_torch(sc: Scenario) -> None:
    assert_same_outcome(sc, run_optserve(sc), run_torch(sc))


@pytest.mark.torch
@pytest.mark.skipif(not HAVE_TORCH, reason="checks the committed fixtures against live torch")
@pytest.mark.parametrize("sc", SCENARIOS, ids=IDS)
def test_fixture_is_current(sc: Scenario) -> None:
    assert fixtures.fixture_path(sc).exists(), (
        f"python -m tests.core.make_group_change_fixtures {sc.id}"
    )
    assert _stored(sc) == run_torch(sc)


def test_every_schedule_gets_a_group_added_and_an_edit() -> None:
    added = {sc.schedule["name"] for sc in SCENARIOS if any(e.kind == "add" for e in sc.events)}
    edited = {sc.schedule["name"] for sc in SCENARIOS if any(e.kind == "edit" for e in sc.events)}
    assert added == TORCH_SCHEDULES
    assert edited == TORCH_SCHEDULES


def test_refusals_say_what_torch_cannot_do() -> None:
    refusals = [(sc, run_optserve(sc)["refused"]) for sc in SCENARIOS]
    refused = [(sc, r) for sc, r in refusals if r is not None]
    # Torch raises in these scenarios, so each must refuse somewhere.
    assert {sc.schedule["name"] for sc, _ in refused} >= {
        "CosineAnnealingLR",
        "CosineAnnealingWarmRestarts",
        "CyclicLR",
        "OneCycleLR",
        "SequentialLR",
        "ChainedScheduler",
        "ReduceLROnPlateau",
    }
    for sc, r in refused:
        message = r["message"]
        assert "add_param_group" in message, message
        assert "torch's" in message, message
        if sc.schedule["name"] == "SequentialLR":
            assert message.startswith("SequentialLR cannot switch to"), message


def test_added_groups_get_no_initial_lr() -> None:
    """As with torch's add_param_group: the schedule's constructor never saw the group."""
    sc = next(s for s in SCENARIOS if s.id == "steplr-add-midrun-and-edits")
    last = run_optserve(sc)["snapshots"][-1]["groups"]
    assert "initial_lr" in last[0]
    assert "initial_lr" not in last[2]

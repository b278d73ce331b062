"""Step semantics: tensor checks, params needed, held or sent params, return modes,
non-finite input, If-Match, manual schedules and LBFGS ask/tell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.sessions.errors import ParamsRequired, PreconditionFailed
from service.sessions.models import StepRequest
from service.sessions.service import SessionService
from service.sessions.store import DiskStore, MemoryStore
from service.sessions.store.disk import SESSIONS_DIR
from tests.sessions.conftest import grads_for, running
from tests.sessions.reference import core_params

pytestmark = pytest.mark.anyio

SHAPES = {"w": (4, 3), "b": (3,)}
PARAMS = {name: {"shape": list(shape)} for name, shape in SHAPES.items()}


def config(**optimizer: Any) -> dict[str, Any]:
    return {"optimizer": {"name": "Adam", "lr": 0.01, **optimizer}, "params": PARAMS}


def start_values() -> dict[str, np.ndarray]:
    return grads_for(SHAPES, seed=99)


async def make(service: SessionService, cfg: dict[str, Any], held: bool) -> str:
    return (await service.create("t", cfg, start_values() if held else None)).id


async def test_deltas_match_core_applied_directly() -> None:
    cfg = {
        **config(weight_decay=0.1, amsgrad=True),
        "clip_grad_norm": {"max_norm": 0.5},
        "schedule": {"name": "ExponentialLR", "gamma": 0.9},
    }
    steps = [grads_for(SHAPES, seed=i) for i in range(12)]
    async with running(MemoryStore()) as service:
        sid = await make(service, cfg, held=True)
        client = {k: v.copy() for k, v in start_values().items()}
        for n, grads in enumerate(steps, start=1):
            reply = await service.step("t", sid, StepRequest(grads=grads))
            assert reply.step == n and reply.applied and not reply.evaluate
            assert reply.tensors is not None
            for name, delta in reply.tensors.items():
                client[name] += delta
        held = await service.params("t", sid)
    want = core_params(cfg, start_values(), steps)
    for name in SHAPES:
        np.testing.assert_array_equal(held[name], want[name])
        np.testing.assert_array_equal(client[name], want[name])
    assert reply.lr == pytest.approx([0.01 * 0.9**12])


async def test_clipping_leaves_the_callers_gradients_alone() -> None:
    cfg = {**config(), "clip_grad_value": {"clip_value": 0.1}}
    async with running(MemoryStore()) as service:
        sid = await make(service, cfg, held=False)
        grads = grads_for(SHAPES, seed=1)
        before = {k: v.copy() for k, v in grads.items()}
        read_only = {k: v.copy() for k, v in grads.items()}
        for v in read_only.values():
            v.flags.writeable = False  # as decoded from a safetensors body
        await service.step("t", sid, StepRequest(grads=grads))
        await service.step("t", sid, StepRequest(grads=read_only))
        for name in SHAPES:
            np.testing.assert_array_equal(grads[name], before[name])


@pytest.mark.parametrize(
    ("grads", "field"),
    [
        ({"w": np.zeros((4, 3))}, "grads.b"),
        ({"w": np.zeros((4, 3)), "b": np.zeros(3), "c": np.zeros(1)}, "grads.c"),
        ({"w": np.zeros((3, 4)), "b": np.zeros(3)}, "grads.w"),
        ({"w": np.zeros(11), "b": np.zeros(3)}, "grads.w"),
        ({"w": np.zeros((4, 3)), "b": np.array(["x", "y", "z"])}, "grads.b"),
        ({"w": np.zeros((4, 3)), "b": np.array([0.0, np.inf, 0.0])}, "grads.b"),
    ],
)
async def test_bad_gradients_are_refused_and_change_nothing(
    grads: dict[str, np.ndarray], field: str
) -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(), held=True)
        before = await service.export_state("t", sid)
        with pytest.raises(InvalidInput) as refused:
            await service.step("t", sid, StepRequest(grads=grads))
        assert refused.value.field == field
        after = await service.export_state("t", sid)
        assert before[1] == after[1]
        assert all(np.array_equal(before[0][k], after[0][k]) for k in before[0])
        assert (await service.get("t", sid)).step == 0


async def test_a_flat_gradient_of_the_right_length_is_reshaped() -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(), held=False)
        grads = grads_for(SHAPES, seed=3)
        flat = {"w": grads["w"].ravel(), "b": grads["b"]}
        a = await service.step("t", sid, StepRequest(grads=flat))
        assert a.tensors is not None and a.tensors["w"].shape == (4, 3)


async def test_params_are_required_when_the_update_reads_them() -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(weight_decay=0.01), held=False)
        with pytest.raises(ParamsRequired):
            await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 1)))
        sent = start_values()
        reply = await service.step(
            "t", sid, StepRequest(grads=grads_for(SHAPES, 1), params=sent, want="params")
        )
        want = core_params(config(weight_decay=0.01), sent, [grads_for(SHAPES, 1)])
        assert reply.tensors is not None
        for name in SHAPES:
            np.testing.assert_array_equal(reply.tensors[name], want[name])
        # Without weight decay the rule ignores params, so none are needed...
        plain = await make(service, config(), held=False)
        await service.step("t", plain, StepRequest(grads=grads_for(SHAPES, 1)))
        # ...unless the new values are asked for.
        with pytest.raises(ParamsRequired):
            await service.step("t", plain, StepRequest(grads=grads_for(SHAPES, 1), want="params"))


async def test_a_session_that_holds_params_refuses_sent_ones() -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(), held=True)
        with pytest.raises(InvalidInput) as refused:
            await service.step(
                "t", sid, StepRequest(grads=grads_for(SHAPES, 1), params=start_values())
            )
        assert refused.value.field == "params"


async def test_return_modes() -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(), held=True)
        none = await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 1), want="none"))
        assert none.tensors is None and none.step == 1
        params = await service.step(
            "t", sid, StepRequest(grads=grads_for(SHAPES, 2), want="params")
        )
        held = await service.params("t", sid)
        assert params.tensors is not None
        for name in SHAPES:
            np.testing.assert_array_equal(params.tensors[name], held[name])
        with pytest.raises(InvalidInput) as bad:
            await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 3), want="both"))
        assert bad.value.field == "return"


async def test_nonfinite_skip_is_reported_and_counted() -> None:
    cfg = {**config(), "nonfinite": "skip"}
    async with running(MemoryStore()) as service:
        sid = await make(service, cfg, held=True)
        await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 1)))
        before = await service.params("t", sid)
        bad = grads_for(SHAPES, 2)
        bad["w"][1, 1] = np.nan
        reply = await service.step("t", sid, StepRequest(grads=bad))
        assert not reply.applied and reply.skipped and reply.step == 1
        assert reply.tensors is not None and all(not d.any() for d in reply.tensors.values())
        after = await service.params("t", sid)
        assert all(np.array_equal(before[k], after[k]) for k in SHAPES)
        info = await service.get("t", sid)
        assert info.skipped_steps == 1 and info.step == 1


async def test_if_match_guards_against_a_moved_session() -> None:
    async with running(MemoryStore()) as service:
        sid = await make(service, config(), held=False)
        await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 1), if_match=0))
        with pytest.raises(PreconditionFailed) as moved:
            await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, 2), if_match=0))
        assert moved.value.etag == '"1"'
        assert (await service.get("t", sid)).step == 1


async def test_manual_schedule_advances_only_when_asked() -> None:
    cfg = {
        **config(),
        "schedule": {
            "name": "ReduceLROnPlateau",
            "patience": 0,
            "factor": 0.5,
            "interval": "manual",
        },
    }
    async with running(MemoryStore()) as service:
        sid = await make(service, cfg, held=False)
        for i in range(3):
            await service.step("t", sid, StepRequest(grads=grads_for(SHAPES, i)))
        assert (await service.get("t", sid)).lr == [0.01]
        with pytest.raises(InvalidInput):
            await service.schedule_step("t", sid, None)  # the plateau needs the metric
        await service.schedule_step("t", sid, 1.0)
        info = await service.schedule_step("t", sid, 2.0)  # worse: reduce
        assert info.lr == [0.005] and info.step == 3
        steps_only = await make(service, config(), held=False)
        with pytest.raises(InvalidInput):
            await service.schedule_step("t", steps_only, None)


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
    a, b = float(x[0]), float(x[1])
    loss = (1 - a) ** 2 + 100 * (b - a * a) ** 2
    grad = np.array([-2 * (1 - a) - 400 * a * (b - a * a), 200 * (b - a * a)])
    return loss, grad


async def test_lbfgs_ask_tell_moves_the_held_params_to_each_asked_point() -> None:
    cfg = {
        "optimizer": {"name": "LBFGS", "lr": 1, "max_iter": 5, "line_search_fn": "strong_wolfe"},
        "params": {"x": {"shape": [2]}},
        "dtype": "float64",
    }
    async with running(MemoryStore()) as service:
        sid = (await service.create("t", cfg, {"x": np.array([-1.5, 2.0])})).id
        x = np.array([-1.5, 2.0])
        asked = 0
        for _ in range(40):
            loss, grad = rosenbrock(x)
            reply = await service.step(
                "t", sid, StepRequest(grads={"x": grad}, loss=loss, want="params")
            )
            assert reply.tensors is not None
            x = reply.tensors["x"]
            np.testing.assert_array_equal(x, (await service.params("t", sid))["x"])
            asked += reply.evaluate
        assert asked > reply.step > 0  # several points asked per completed step
        assert rosenbrock(x)[0] < rosenbrock(np.array([-1.5, 2.0]))[0] / 10
        with pytest.raises(InvalidInput) as no_loss:
            await service.step("t", sid, StepRequest(grads={"x": grad}))
        assert no_loss.value.field == "loss"


async def test_a_refused_large_step_stores_nothing_on_disk(tmp_path: Path) -> None:
    """A large step's tensors are written while its values are checked; a refused one
    leaves the log as it was, and the session goes on from its last stored step."""
    shapes = {"w": (100_000,)}
    cfg = {"optimizer": {"name": "Adam", "lr": 0.01}, "params": {"w": {"shape": [100_000]}}}
    steps = [grads_for(shapes, seed=i) for i in range(3)]
    bad = {"w": steps[1]["w"].copy()}
    bad["w"][-1] = np.nan
    async with running(DiskStore(tmp_path)) as service:
        sid = (await service.create("t", cfg, {"w": np.zeros(100_000, np.float32)})).id
        await service.step("t", sid, StepRequest(grads=steps[0]))
        [log] = (tmp_path / SESSIONS_DIR / sid).glob("log-*.bin")
        before = log.read_bytes()  # its frame, and zeros written ahead of the next ones
        with pytest.raises(InvalidInput):
            await service.step("t", sid, StepRequest(grads=bad))
        after = log.read_bytes()
        assert after == before[: len(after)] and not any(before[len(after) :])
        for grads in steps[1:]:
            await service.step("t", sid, StepRequest(grads=grads))
    async with running(DiskStore(tmp_path)) as service:
        info = await service.get("t", sid)
        held = await service.params("t", sid)
    assert info.step == 3
    want = core_params(cfg, {"w": np.zeros(100_000, np.float32)}, steps)
    np.testing.assert_array_equal(held["w"], want["w"])

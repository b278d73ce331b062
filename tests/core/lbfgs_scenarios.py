"""LBFGS scenarios run the same way through optserve's ask/tell machine and torch.optim.

Both sides evaluate the same numpy objective, so the loss and gradient at a point are the
same bits on either side: any difference in the points comes from the optimizer alone.
``tests/core/make_lbfgs_fixtures.py`` stores torch's side under ``fixtures/lbfgs`` for
machines without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.core.optimizers import get
from service.core.optimizers.lbfgs import LBFGS, LBFGSState

FIXTURES = Path(__file__).parent / "fixtures" / "lbfgs"

Objective = Callable[[np.ndarray, int], tuple[float, np.ndarray]]
"""(flat point, index of the step()) -> (loss, flat gradient), both in float64."""


def rosenbrock(x: np.ndarray, step: int) -> tuple[float, np.ndarray]:
    """The chained Rosenbrock function, minimum 0 at all ones."""
    a, b = x[:-1], x[1:]
    loss = float(np.sum(100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2))
    grad = np.zeros_like(x)
    grad[:-1] = -400.0 * a * (b - a * a) - 2.0 * (1.0 - a)
    grad[1:] += 200.0 * (b - a * a)
    return loss, grad


def _quadratic_terms(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = q @ np.diag(np.geomspace(1.0, 50.0, n)) @ q.T
    return (A + A.T) / 2, rng.standard_normal(n)


_A, _B = _quadratic_terms(8)


def quadratic(x: np.ndarray, step: int) -> tuple[float, np.ndarray]:
    """An ill-conditioned convex quadratic ``x'Ax/2 - b'x`` (condition number 50)."""
    ax = _A @ x
    return float(0.5 * x @ ax - _B @ x), ax - _B


_NOISE = np.random.default_rng(11).standard_normal((64, 8))


def noisy_quadratic(x: np.ndarray, step: int) -> tuple[float, np.ndarray]:
    """The quadratic with a different gradient noise draw each step (a minibatch stand-in)."""
    loss, grad = quadratic(x, step)
    return loss, grad + 0.01 * _NOISE[step % len(_NOISE)]


def biased(x: np.ndarray, step: int) -> tuple[float, np.ndarray]:
    """``x'x/2`` told with the gradient ``x + 1/2``: the loss and the slope disagree.

    Clients with bugs send such pairs. The line search then never meets the Wolfe
    conditions and shrinks its bracket until it is too small, and steps stall on the
    lack-of-progress test.
    """
    return float(0.5 * x @ x), x + 0.5


def mismatched(x: np.ndarray, step: int) -> tuple[float, np.ndarray]:
    """A wavy loss told with a scaled, shifted gradient: cubic steps land on the bracket."""
    loss = float(0.5 * x @ x + np.sum(np.sin(2.0 * x)))
    return loss, 0.6 * (x + 2.0 * np.cos(2.0 * x)) - 0.7


OBJECTIVES: dict[str, Objective] = {
    "rosenbrock": rosenbrock,
    "quadratic": quadratic,
    "noisy_quadratic": noisy_quadratic,
    "biased": biased,
    "mismatched": mismatched,
}


@dataclass(frozen=True)
class Scenario:
    id: str
    objective: str
    hp: dict[str, Any]
    x0: tuple[float, ...]
    shapes: tuple[tuple[int, ...], ...]
    """How the flat vector is split into the session's tensors."""
    steps: int
    dtype: str = "float64"
    plateau: dict[str, Any] | None = None
    """ReduceLROnPlateau's arguments: stepped as ``scheduler.step(optimizer.step(closure))``."""


ROSENBROCK_X0 = (-1.2, 1.0)
CHAINED_X0 = (-1.2, 1.0, -1.2, 1.0, -0.5, 0.8)
QUADRATIC_X0 = tuple(float(v) for v in np.linspace(-1.0, 1.0, 8))

ASK_TELL = [
    # The classic start in the banana valley: bracketing, zoom, convergence, and then
    # steps that return right after the first evaluation (gradient below tolerance).
    Scenario(
        "rosenbrock-wolfe",
        "rosenbrock",
        {"line_search_fn": "strong_wolfe"},
        ROSENBROCK_X0,
        ((1,), (1,)),
        steps=8,
    ),
    Scenario(
        "rosenbrock-wolfe-short-history",
        "rosenbrock",
        {"line_search_fn": "strong_wolfe", "history_size": 2, "max_iter": 5},
        ROSENBROCK_X0,
        ((2,),),
        steps=10,
    ),
    # max_eval cuts line searches short (the search's max_ls runs out): after a few
    # trials, and with max_eval 1 right after the first.
    Scenario(
        "rosenbrock-wolfe-max-eval",
        "rosenbrock",
        {"line_search_fn": "strong_wolfe", "max_iter": 6, "max_eval": 4},
        CHAINED_X0,
        ((3,), (3,)),
        steps=10,
    ),
    Scenario(
        "rosenbrock-wolfe-one-eval",
        "rosenbrock",
        {"line_search_fn": "strong_wolfe", "max_iter": 3, "max_eval": 1, "lr": 0.3},
        ROSENBROCK_X0,
        ((2,),),
        steps=8,
    ),
    Scenario(
        "rosenbrock-fixed",
        "rosenbrock",
        {"max_iter": 5, "lr": 0.1, "history_size": 4},
        CHAINED_X0,
        ((2, 3),),
        steps=10,
    ),
    # Converges to the gradient tolerance, so the last steps return after one evaluation.
    Scenario(
        "quadratic-wolfe",
        "quadratic",
        {
            "line_search_fn": "strong_wolfe",
            "max_iter": 10,
            "history_size": 4,
            "tolerance_grad": 1e-4,
        },
        QUADRATIC_X0,
        ((4,), (2, 2)),
        steps=8,
    ),
    # A large tolerance_change stops steps on ``max |t d| <= tolerance_change``.
    Scenario(
        "quadratic-fixed",
        "quadratic",
        {"max_iter": 4, "lr": 0.5, "history_size": 3, "tolerance_change": 1e-4},
        QUADRATIC_X0,
        ((8,),),
        steps=12,
    ),
    Scenario(
        "biased-wolfe",
        "biased",
        {"line_search_fn": "strong_wolfe", "lr": 0.3},
        (1.0, -2.0, 0.5),
        ((3,),),
        steps=6,
    ),
    Scenario(
        "mismatched-wolfe",
        "mismatched",
        {"line_search_fn": "strong_wolfe"},
        (1.0, -2.0, 0.5),
        ((1,), (2,)),
        steps=4,
    ),
]

SINGLE_ITERATION = [
    Scenario(
        f"noisy-quadratic-one-iteration-{dtype}",
        "noisy_quadratic",
        {"max_iter": 1, "lr": lr, "history_size": 5},
        QUADRATIC_X0,
        ((2, 2), (4,)),
        steps=50,
        dtype=dtype,
    )
    for dtype, lr in (("float64", 0.3), ("float32", 0.1))
]

# ReduceLROnPlateau fed what step() returns, the loss of its first closure call: thresholds
# and patience picked so that the last call's loss would cut the lr at other steps.
PLATEAU = [
    Scenario(
        "rosenbrock-fixed-plateau",
        "rosenbrock",
        {"max_iter": 5, "lr": 0.1, "history_size": 4},
        CHAINED_X0,
        ((2, 3),),
        steps=12,
        plateau={"patience": 0, "factor": 0.5, "threshold": 0.2},
    ),
    Scenario(
        "rosenbrock-wolfe-plateau",
        "rosenbrock",
        {"line_search_fn": "strong_wolfe", "max_iter": 3},
        ROSENBROCK_X0,
        ((1,), (1,)),
        steps=10,
        plateau={"patience": 0, "factor": 0.5, "threshold": 0.1},
    ),
]

SCENARIOS = {s.id: s for s in ASK_TELL + SINGLE_ITERATION + PLATEAU}


def describe(scenario: Scenario) -> dict[str, Any]:
    """The scenario as JSON, stored beside its fixture to detect stale fixtures."""
    return {
        "objective": scenario.objective,
        "hp": scenario.hp,
        "x0": list(scenario.x0),
        "shapes": [list(s) for s in scenario.shapes],
        "steps": scenario.steps,
        "dtype": scenario.dtype,
        **({"plateau": scenario.plateau} if scenario.plateau is not None else {}),
    }


@dataclass
class Trace:
    """What a run did: every point evaluated, and where each step() ended."""

    points: list[np.ndarray] = field(default_factory=list)
    """Flat float64 copies of the parameters at every closure call, in order."""
    step_ends: list[int] = field(default_factory=list)
    """``len(points)`` when each step() returned."""
    params: list[np.ndarray] = field(default_factory=list)
    """Flat parameters after each step()."""
    func_evals: list[int] = field(default_factory=list)
    n_iter: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    """The lr after each step() and its scheduler step (scenarios with a schedule)."""

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "points": np.array(self.points),
            "step_ends": np.array(self.step_ends, dtype=np.int64),
            "params": np.array(self.params),
            "func_evals": np.array(self.func_evals, dtype=np.int64),
            "n_iter": np.array(self.n_iter, dtype=np.int64),
        }
        if self.lrs:
            arrays["lrs"] = np.array(self.lrs)
        return arrays


def _split(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    out, offset = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(flat[offset : offset + size].reshape(shape).copy())
        offset += size
    return out


def _flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays]).astype(np.float64)


class OptserveRun:
    """Drives ``LBFGS.tell`` (or ``update``) like a session that holds the parameters.

    ``observe`` is called before every tell with the run itself, so a test can snapshot
    or replace ``state`` at any point of a step.
    """

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.optimizer: LBFGS = get("lbfgs")  # type: ignore[assignment]
        self.hp = self.optimizer.resolve(scenario.hp)
        self.dtype = np.dtype(scenario.dtype)
        self.params = _split(np.array(scenario.x0, dtype=self.dtype), scenario.shapes)
        self.state: LBFGSState = self.optimizer.init(scenario.shapes, self.hp, self.dtype)
        self.objective = OBJECTIVES[scenario.objective]
        self.outs: list[list[np.ndarray]] = []
        self.phases: list[str] = []

    def evaluate(self, step: int) -> tuple[float, list[np.ndarray]]:
        loss, grad = self.objective(_flat(self.params), step)
        return loss, _split(grad.astype(self.dtype), self.scenario.shapes)

    def run(self, observe: Callable[[OptserveRun], None] | None = None) -> Trace:
        trace = Trace()
        for step in range(self.scenario.steps):
            while True:
                if observe is not None:
                    observe(self)
                trace.points.append(_flat(self.params))
                loss, grads = self.evaluate(step)
                out = [np.empty_like(p) for p in self.params]
                self.phases.append(self.state.phase)
                if self.optimizer.ask_tell(self.hp):
                    result = self.optimizer.tell(loss, grads, self.state, self.params, self.hp, out)
                    completed = result.completed
                    assert result.evaluate is not completed
                else:
                    self.state = self.optimizer.update(grads, self.state, None, self.hp, out)
                    completed = True
                self.outs.append(out)
                for p, o in zip(self.params, out, strict=True):
                    p += o
                if completed:
                    break
            trace.step_ends.append(len(trace.points))
            trace.params.append(_flat(self.params))
            trace.func_evals.append(self.state.func_evals)
            trace.n_iter.append(self.state.n_iter)
        return trace


def run_torch(scenario: Scenario) -> Trace:
    """The same scenario through ``torch.optim.LBFGS``, recording every closure call."""
    import torch

    dtype = getattr(torch, scenario.dtype)
    flat0 = np.array(scenario.x0, dtype=scenario.dtype)
    tensors = [
        torch.tensor(a, dtype=dtype, requires_grad=True) for a in _split(flat0, scenario.shapes)
    ]
    opt = torch.optim.LBFGS(tensors, **scenario.hp)
    scheduler = None
    if scenario.plateau is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **scenario.plateau)
    objective = OBJECTIVES[scenario.objective]
    trace = Trace()
    for step in range(scenario.steps):

        def closure(step: int = step) -> float:
            flat = _flat([t.detach().numpy() for t in tensors])
            trace.points.append(flat)
            loss, grad = objective(flat, step)
            for t, g in zip(
                tensors, _split(grad.astype(scenario.dtype), scenario.shapes), strict=True
            ):
                t.grad = torch.from_numpy(g)
            return loss

        loss = opt.step(closure)
        if scheduler is not None:
            scheduler.step(loss)
            trace.lrs.append(float(opt.param_groups[0]["lr"]))
        trace.step_ends.append(len(trace.points))
        trace.params.append(_flat([t.detach().numpy() for t in tensors]))
        state = opt.state[tensors[0]]
        trace.func_evals.append(int(state["func_evals"]))
        trace.n_iter.append(int(state["n_iter"]))
    return trace


def load_fixture(scenario: Scenario) -> Trace:
    with np.load(FIXTURES / f"{scenario.id}.npz") as data:
        return Trace(
            points=list(data["points"]),
            step_ends=[int(v) for v in data["step_ends"]],
            params=list(data["params"]),
            func_evals=[int(v) for v in data["func_evals"]],
            n_iter=[int(v) for v in data["n_iter"]],
            lrs=[float(v) for v in data["lrs"]] if "lrs" in data.files else [],
        )

"""Digests of sessions stepped through core, to compare replays across machines.

A replica that takes a session over replays its logged events through core and must
arrive, bit for bit, at the state the previous owner acknowledged. This script steps a
fixed set of sessions (optimizers whose updates reduce: norms, means, dot products,
matrix products; float32 and float64; tensors small enough for one block, large enough
for several, and large enough to be split over threads) and prints one XXH3 digest per
session of every parameter and state array and of the JSON state. Run it under two
environments (CPU features, BLAS kernel and threads, optserve's thread count) and
compare: ``tests/core/test_replay_determinism.py`` does.

The "client" here uses only elementwise IEEE operations (correctly rounded, so the same
on every machine) and in-order sums, so a difference in the digests is core's.

    python -m tests.core.replay_digest [--core-threads N] [--sizes 1k,300k,3M]
                                       [--cases adam,muon,...] [--match 'muon/3M/*']
                                       [--steps N]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from service.core import kernels, machine
from service.core.plan import plan_from_config
from service.core.training import apply_step, initial_state, state_to_flat

Shapes = dict[str, tuple[int, ...]]

SIZES: dict[str, tuple[int, int]] = {
    # name: the main matrix (rows, cols); every session also has a small second tensor.
    "1k": (25, 40),
    "300k": (500, 600),
    "3M": (1500, 2000),
}
"""1k fits one block, 300k is several blocks on one thread, 3M is split over threads
(``kernels.PARALLEL_MIN``) and is large enough for BLAS to use several threads."""


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: Mapping[str, Any]
    extra: Mapping[str, Any]
    """Session config beyond params, dtype and optimizer (clipping)."""
    matrices_only: bool = False
    """Muon takes 2-D tensors only: the second tensor is a small matrix, not a vector."""


CASES: tuple[Case, ...] = (
    Case("adam", {"name": "Adam", "lr": 1e-3}, {}),
    Case(
        "sgd-clip2",
        {"name": "SGD", "lr": 0.1, "momentum": 0.9},
        {"clip_grad_norm": {"max_norm": 1.0}},
    ),
    Case(
        "sgd-clip3",
        {"name": "SGD", "lr": 0.1},
        {"clip_grad_norm": {"max_norm": 1.0, "norm_type": 3.0}},
    ),
    Case("adafactor", {"name": "Adafactor", "lr": 1e-2, "weight_decay": 0.01}, {}),
    Case("muon", {"name": "Muon", "lr": 1e-2}, {}, matrices_only=True),
    Case(
        "lbfgs",
        {"name": "LBFGS", "lr": 1.0, "line_search_fn": "strong_wolfe", "max_iter": 3},
        {},
    ),
    Case("radam", {"name": "RAdam", "lr": 1e-3, "weight_decay": 0.01}, {}),
    Case("nadam", {"name": "NAdam", "lr": 1e-3}, {}),
    Case("rmsprop-centered", {"name": "RMSprop", "lr": 1e-3, "centered": True}, {}),
    Case("asgd", {"name": "ASGD", "lr": 1e-2, "t0": 1.0}, {}),
    Case("prodigy", {"name": "Prodigy", "weight_decay": 0.01}, {}),
    Case("came", {"name": "CAME", "lr": 1e-3, "weight_decay": 0.01}, {}),
    Case("soap", {"name": "SOAP", "precondition_frequency": 2}, {}),
    Case(
        "adamw-onecycle",
        {"name": "AdamW", "lr": 1e-3},
        {"schedule": {"name": "OneCycleLR", "max_lr": 1e-2, "total_steps": 100}},
    ),
)


def shapes_of(case: Case, size: str) -> Shapes:
    rows, cols = SIZES[size]
    second = (4, cols) if case.matrices_only else (cols,)
    return {"w": (rows, cols), "b": second}


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Values in [-0.5, 0.5): an exact conversion of random bits, then one exact subtraction."""
    values: np.ndarray = rng.random(shape, dtype=dtype)
    values -= dtype.type(0.5)
    return values


class Quadratic:
    """``f(x) = sum h (x - c)^2 / 2`` for LBFGS, whose line search evaluates where it chooses."""

    def __init__(self, rng: np.random.Generator, shapes: Shapes, dtype: np.dtype[Any]) -> None:
        self.h = {n: _uniform(rng, s, dtype) + dtype.type(1.0) for n, s in shapes.items()}
        self.c = {n: _uniform(rng, s, dtype) for n, s in shapes.items()}

    def evaluate(self, params: Mapping[str, np.ndarray]) -> tuple[float, dict[str, np.ndarray]]:
        grads = {n: self.h[n] * (p - self.c[n]) for n, p in params.items()}
        # cumsum adds strictly in order (no pairwise or SIMD split): the same everywhere.
        loss = math.fsum(
            float(np.cumsum(0.5 * (grads[n] * (p - self.c[n])).astype(np.float64))[-1])
            for n, p in params.items()
        )
        return loss, grads


def digest(arrays: Mapping[str, np.ndarray], meta: Any) -> dict[str, str]:
    """One XXH3-64 per array (name, dtype, shape and bytes) and one of the JSON rest."""
    out = {}
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h = xxhash.xxh3_64(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
        out[name] = h.hexdigest()
    out["meta"] = xxhash.xxh3_64(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    return out


def run_case(case: Case, size: str, dtype_name: str, steps: int) -> dict[str, str]:
    shapes = shapes_of(case, size)
    config = {
        "params": {n: {"shape": list(s)} for n, s in shapes.items()},
        "dtype": dtype_name,
        "optimizer": dict(case.optimizer),
        **case.extra,
    }
    plan = plan_from_config(config)
    dtype = plan.dtype
    rng = np.random.Generator(np.random.PCG64(20261203))
    names = [t.name for t in plan.tensors]
    params = {n: _uniform(rng, shapes[n], dtype) for n in names}
    out = [np.empty(shapes[n], dtype) for n in names]
    state = initial_state(plan)
    quadratic = Quadratic(rng, shapes, dtype) if plan.ask_tell else None
    completed = evaluations = 0
    while completed < steps:
        loss: float | None = None
        if quadratic is not None:
            loss, by_name = quadratic.evaluate(params)
            grads = [by_name[n] for n in names]
        else:
            grads = [_uniform(rng, shapes[n], dtype) for n in names]
        held = [params[n] for n in names] if plan.needs_params else None
        outcome = apply_step(plan, state, list(grads), held, out, loss)
        assert outcome.applied, outcome.reason
        for n, d in zip(names, out, strict=True):
            params[n] += d
        completed += outcome.completed
        evaluations += 1
        if evaluations > 20 * steps:
            raise RuntimeError(f"{case.name} did not complete {steps} steps")
    arrays, meta = state_to_flat(plan, state)
    arrays.update({f"param/{n}": p for n, p in params.items()})
    return digest(arrays, meta)


def case_ids(cases: Sequence[Case], sizes: Sequence[str]) -> list[tuple[Case, str, str]]:
    return [(c, s, d) for c in cases for s in sizes for d in ("float32", "float64")]


def environment() -> dict[str, Any]:
    """What numpy dispatches on and which BLAS it runs, and optserve's kernel threads."""
    return {**machine.describe(), "core_threads": kernels.thread_count()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--core-threads", type=int, help="optserve's kernel thread count")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: 1k,300k,3M")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--match",
        action="append",
        help="only sessions whose id (case/size/dtype) matches this glob; repeatable",
    )
    args = parser.parse_args(argv)
    if args.core_threads is not None:
        kernels.set_threads(args.core_threads)
    wanted = args.cases.split(",")
    cases = [c for c in CASES if c.name in wanted]
    unknown = set(wanted) - {c.name for c in cases}
    if unknown:
        parser.error(f"unknown cases: {sorted(unknown)}")
    sizes = args.sizes.split(",")
    results: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for case, size, dtype_name in case_ids(cases, sizes):
        key = f"{case.name}/{size}/{dtype_name}"
        if args.match and not any(fnmatch.fnmatchcase(key, m) for m in args.match):
            continue
        start = time.perf_counter()
        results[key] = run_case(case, size, dtype_name, args.steps)
        timing[key] = round(time.perf_counter() - start, 3)
    json.dump({"environment": environment(), "digests": results, "seconds": timing}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

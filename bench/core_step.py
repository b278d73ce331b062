"""Step time of optserve's numpy optimizers next to torch.optim, in one process.

    python bench/core_step.py [--sizes 1e6,1e7] [--rounds 12] [--optimizers adam,adagrad]

Each row is one float32 tensor of the given size. optserve's ``update`` writes the delta
into a preallocated buffer (what a session computes per step); torch's ``step()`` updates
the parameter in place. Both see the same gradient.

How it is timed: rounds alternate a run of consecutive optserve steps with a run of
consecutive torch steps, the first step of each run untimed (torch's OpenMP threads and
both sides' caches are then warm, as in a training loop). On a shared machine other
processes distort the numbers, torch's the most: an OpenMP parallel region waits for
its slowest thread, so one busy core can stretch a 2 ms step to 50 ms. Where the kernel
reports CPU time (``/proc/stat``), a round during which other processes used more than
a sliver of CPU is discarded and repeated, up to ``--max-seconds``; the table says how
many rounds were kept. Medians are over the steps of the kept rounds; "best" is the
fastest single step, the least disturbed by anything else the machine was doing.
``--apply`` also adds the delta to the parameters, as a session that holds them does.
Needs torch (``pip install torch==2.13.0``). The optimizers torch lacks run beside their
reference packages' own ``step()`` (``pip install -e '.[reference-optimizers]'``).
schedulefree divides the gradient in place; for those rows both sides restore the
gradient before each step (one copy each), so every step sees the same input.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.core import kernels, optimizers


@dataclass(frozen=True)
class Contender:
    label: str
    optimizer: str
    hparams: dict[str, Any]
    reference: tuple[str, str] | None = None
    """(module, class) of the reference package; ``None`` for torch.optim's class."""
    restores_grad: bool = False
    """The reference overwrites the gradient: restore it before every step, both sides."""
    rows: int | None = None
    """Bench a matrix of ``size / rows`` by ``rows`` instead of a vector: for rules that
    treat matrices differently (CAME's factored moments, SOAP's bases)."""

    def shape(self, size: int) -> tuple[int, ...]:
        return (size,) if self.rows is None else (size // self.rows, self.rows)


CONTENDERS = {
    "adam": Contender("Adam", "Adam", {}),
    "adamw": Contender("AdamW", "AdamW", {}),
    "sgd-momentum": Contender("SGD momentum=0.9", "SGD", {"lr": 0.01, "momentum": 0.9}),
    "rmsprop": Contender("RMSprop", "RMSprop", {}),
    "adagrad": Contender("Adagrad", "Adagrad", {}),
    "adadelta": Contender("Adadelta", "Adadelta", {}),
    "adamax": Contender("Adamax", "Adamax", {}),
    "lion": Contender(
        "Lion (lion-pytorch)", "Lion", {"weight_decay": 0.01}, ("lion_pytorch", "Lion")
    ),
    "adamwschedulefree": Contender(
        "AdamWScheduleFree (schedulefree)",
        "AdamWScheduleFree",
        {"weight_decay": 0.01},
        ("schedulefree", "AdamWScheduleFree"),
        restores_grad=True,
    ),
    "sgdschedulefree": Contender(
        "SGDScheduleFree (schedulefree)",
        "SGDScheduleFree",
        {"lr": 0.01},
        ("schedulefree", "SGDScheduleFree"),
        restores_grad=True,
    ),
    "prodigy": Contender(
        "Prodigy (prodigyopt)", "Prodigy", {"weight_decay": 0.01}, ("prodigyopt", "Prodigy")
    ),
    "came": Contender(
        "CAME (came-pytorch), 1000 columns",
        "CAME",
        {"lr": 2e-4, "weight_decay": 0.01},
        ("came_pytorch", "CAME"),
        rows=1000,
    ),
    # A basis of 1000 x 1000 per dimension up to 1000: at 10M the 10000 rows go without.
    "soap": Contender(
        "SOAP (pytorch_optimizer), 1000 columns",
        "SOAP",
        {"max_precondition_dim": 1000},
        ("pytorch_optimizer", "SOAP"),
        rows=1000,
    ),
}

QUIET_SHARE = 0.05
"""A round is kept if other processes used at most this share of its wall time x cores."""


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot, or None if unknown."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timings:
    ours: list[float]
    theirs: list[float]
    kept: int = 0
    rounds: int = 0


def _timed_run(step: Callable[[], None], count: int, into: list[float]) -> None:
    step()  # untimed: wakes threads, warms caches
    for _ in range(count):
        t0 = time.perf_counter()
        step()
        into.append(time.perf_counter() - t0)


def bench(
    contender: Contender, size: int, want_rounds: int, max_seconds: float, apply: bool
) -> Timings:
    import torch

    rng = np.random.default_rng(0)
    shape = contender.shape(size)
    grad = rng.standard_normal(shape, dtype=np.float32)
    param = rng.standard_normal(shape, dtype=np.float32)
    delta = np.empty_like(param)

    opt = optimizers.get(contender.optimizer)
    hp = opt.resolve(contender.hparams)
    state = opt.init([param.shape], hp, np.dtype(np.float32))
    given_params = [param] if opt.needs_params(hp) else None

    t_param = torch.nn.Parameter(torch.from_numpy(param.copy()))
    t_param.grad = torch.from_numpy(grad.copy())
    if contender.reference is None:
        t_cls = getattr(torch.optim, opt.name)
    else:
        module, name = contender.reference
        t_cls = getattr(importlib.import_module(module), name)
    t_opt = t_cls([t_param], **contender.hparams)
    if callable(getattr(t_opt, "train", None)):
        t_opt.train()  # schedule-free: steps need train mode
    t_grad = torch.from_numpy(grad.copy())
    given_grad = grad.copy()

    def numpy_step() -> None:
        nonlocal state
        if contender.restores_grad:
            np.copyto(given_grad, grad)
        state = opt.update([given_grad], state, given_params, hp, [delta])
        if apply:
            np.add(param, delta, out=param)

    def torch_step() -> None:
        if contender.restores_grad:
            assert t_param.grad is not None
            t_param.grad.copy_(t_grad)
        t_opt.step()

    # Enough steps per run that a round spans several scheduler ticks.
    per_run = max(3, int(2e7 // size))
    cores = os.cpu_count() or 1
    timings = Timings([], [])
    deadline = time.monotonic() + max_seconds
    while timings.kept < want_rounds and time.monotonic() < deadline:
        ours: list[float] = []
        theirs: list[float] = []
        busy0, cpu0, wall0 = _busy_seconds(), time.process_time(), time.perf_counter()
        _timed_run(numpy_step, per_run, ours)
        _timed_run(torch_step, per_run, theirs)
        busy1, cpu1, wall1 = _busy_seconds(), time.process_time(), time.perf_counter()
        timings.rounds += 1
        if busy0 is not None and busy1 is not None:
            others = (busy1 - busy0) - (cpu1 - cpu0)
            if others > QUIET_SHARE * (wall1 - wall0) * cores:
                continue
        timings.kept += 1
        timings.ours += ours
        timings.theirs += theirs
    if timings.kept == 0:  # never quiet: report what was seen rather than nothing
        timings.ours, timings.theirs = ours, theirs
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated element counts")
    parser.add_argument("--rounds", type=int, default=12, help="quiet rounds to collect")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per row")
    parser.add_argument(
        "--optimizers",
        default="adam,adamw,sgd-momentum,rmsprop,adagrad",
        help=f"comma-separated, from: {', '.join(CONTENDERS)}",
    )
    parser.add_argument("--threads", type=int, default=None, help="optserve kernel threads")
    parser.add_argument("--apply", action="store_true", help="also add the delta to params")
    args = parser.parse_args(argv)

    import torch

    if args.threads is not None:
        kernels.set_threads(args.threads)
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    print(
        f"float32, one tensor; numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} cores; median ms per step"
    )
    print()
    print(
        "| optimizer | params | optserve ms | torch ms | ratio "
        "| best optserve ms | best torch ms | best ratio | quiet rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.optimizers.split(","):
        contender = CONTENDERS[key.strip()]
        for size in sizes:
            t = bench(contender, size, args.rounds, args.max_seconds, args.apply)
            ours, theirs = statistics.median(t.ours) * 1e3, statistics.median(t.theirs) * 1e3
            best_ours, best_theirs = min(t.ours) * 1e3, min(t.theirs) * 1e3
            print(
                f"| {contender.label} | {size / 1e6:g}M | {ours:.2f} | {theirs:.2f} | "
                f"{ours / theirs:.2f} | {best_ours:.2f} | {best_theirs:.2f} | "
                f"{best_ours / best_theirs:.2f} | {t.kept}/{t.rounds} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

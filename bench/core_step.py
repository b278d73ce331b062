"""Step time of optserve's numpy optimizers next to torch.optim, in one process.

    python bench/core_step.py [--sizes 1e6,1e7] [--repeats 30] [--optimizers adam,sgd-momentum]

Each row times one float32 tensor of the given size: optserve's ``update`` (which writes
the delta into a preallocated buffer) and ``torch.optim``'s ``step()`` (which updates the
parameter in place), both on the same gradient. The two are timed alternately, step by
step, so that load from other processes lands on both alike; the table shows the median
of the repeats. ``--apply`` also adds the delta to the parameters, as a session that
holds them does. Needs torch (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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


CONTENDERS = {
    "adam": Contender("Adam", "Adam", {}),
    "adamw": Contender("AdamW", "AdamW", {}),
    "sgd-momentum": Contender("SGD momentum=0.9", "SGD", {"lr": 0.01, "momentum": 0.9}),
    "rmsprop": Contender("RMSprop", "RMSprop", {}),
    "adagrad": Contender("Adagrad", "Adagrad", {}),
    "adadelta": Contender("Adadelta", "Adadelta", {}),
    "adamax": Contender("Adamax", "Adamax", {}),
}


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def bench(contender: Contender, size: int, repeats: int, apply: bool) -> tuple[float, float]:
    import torch

    rng = np.random.default_rng(0)
    grad = rng.standard_normal(size, dtype=np.float32)
    param = rng.standard_normal(size, dtype=np.float32)
    delta = np.empty_like(param)

    opt = optimizers.get(contender.optimizer)
    hp = opt.resolve(contender.hparams)
    state = opt.init([param.shape], hp, np.dtype(np.float32))
    given_params = [param] if opt.needs_params(hp) else None

    t_param = torch.nn.Parameter(torch.from_numpy(param.copy()))
    t_param.grad = torch.from_numpy(grad.copy())
    t_opt = getattr(torch.optim, opt.name)([t_param], **contender.hparams)

    def numpy_step() -> None:
        nonlocal state
        state = opt.update([grad], state, given_params, hp, [delta])
        if apply:
            np.add(param, delta, out=param)

    ours: list[float] = []
    theirs: list[float] = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        numpy_step()
        t1 = time.perf_counter()
        t_opt.step()
        t2 = time.perf_counter()
        if i >= 3:  # the first steps allocate state and fault pages in
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
    return _median_ms(ours), _median_ms(theirs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e6,1e7", help="comma-separated element counts")
    parser.add_argument("--repeats", type=int, default=30)
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
        f"float32, median of {args.repeats} steps; numpy {np.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print()
    print("| optimizer | params | optserve ms | torch ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for key in args.optimizers.split(","):
        contender = CONTENDERS[key.strip()]
        for size in sizes:
            ours, theirs = bench(contender, size, args.repeats, args.apply)
            label = f"{size / 1e6:g}M"
            print(
                f"| {contender.label} | {label} | {ours:.2f} | {theirs:.2f} | "
                f"{ours / theirs:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

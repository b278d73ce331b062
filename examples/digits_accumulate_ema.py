#!/usr/bin/env python
"""Digits with four simulated workers accumulating on one session, and EMA weights.

An optserve session holds a small MLP's parameters and accumulates over 4 posts per step
(``"accumulate": {"steps": 4}``): each step, four workers (threads) each take a quarter of
the mini-batch, compute its gradient at the session's current weights and post it; the
fourth post applies one AdamW step to their mean. The session also keeps an EMA of the
weights (``"averaging": {"kind": "ema", "decay": 0.95}``). At the end the script prints
the test accuracy of the raw weights and of the EMA weights, reads the loss and
gradient-norm history back from ``GET .../steps`` and draws it to a PNG.

    optserve serve &                     # or any running server
    python examples/digits_accumulate_ema.py --url http://127.0.0.1:8000 --png history.png

Needs torch, scikit-learn and matplotlib. Exits non-zero unless the model learned.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

try:
    from optserve_client import Client
except ImportError:  # run from a checkout without installing the client
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))
    from optserve_client import Client

WORKERS = 4


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("OPTSERVE_API_KEY"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--png", type=Path, default=Path("digits_accumulate_ema.png"))
    return parser.parse_args()


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()


def load(net: torch.nn.Module, values: dict[str, np.ndarray]) -> None:
    net.load_state_dict({name: torch.from_numpy(v.copy()) for name, v in values.items()})


def accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).double().mean())


def main() -> None:
    args = arguments()
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0
    )
    x_train, x_test = torch.tensor(x_train), torch.tensor(x_test)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    net = model()
    initial = {name: p.detach().numpy().copy() for name, p in net.named_parameters()}
    # Each worker has its own copy of the network, set to the session's weights per step.
    workers = [model() for _ in range(WORKERS)]

    with Client(args.url, api_key=args.api_key, wire="safetensors") as client:
        session = client.create_session(
            {"name": "AdamW", "lr": 0.01, "weight_decay": 0.01},
            initial,
            schedule={"name": "CosineAnnealingLR", "T_max": 200, "eta_min": 1e-4},
            dtype="float64",
            clip_grad_norm=5.0,
            accumulate={"steps": WORKERS},
            averaging={"kind": "ema", "decay": 0.95},
        )

        def work(
            k: int, xb: torch.Tensor, yb: torch.Tensor, weights: dict[str, np.ndarray]
        ) -> bool:
            worker = workers[k]
            load(worker, weights)
            worker.zero_grad()
            loss = torch.nn.functional.cross_entropy(worker(xb), yb)
            loss.backward()
            grads = {n: p.grad.numpy() for n, p in worker.named_parameters()}  # type: ignore[union-attr]
            return session.step(grads, loss=float(loss.detach()), returns="none").applied

        generator = torch.Generator().manual_seed(1)
        with ThreadPoolExecutor(WORKERS) as pool:
            for _ in range(args.epochs):
                order = torch.randperm(len(x_train), generator=generator)
                for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
                    batch = order[start : start + args.batch_size]
                    weights = session.params()
                    shards = batch.chunk(WORKERS)
                    jobs = [
                        pool.submit(work, k, x_train[s], y_train[s], weights)
                        for k, s in enumerate(shards)
                    ]
                    applied = [job.result() for job in jobs]
                    # Exactly one of the four posts completes the step, whichever came last.
                    assert sum(applied) == 1, applied

        load(net, session.params())
        raw = accuracy(net, x_test, y_test)
        load(net, session.params(average=True))
        ema = accuracy(net, x_test, y_test)
        history = session.steps()
        session.delete()

    print(f"{len(history)} steps of {WORKERS} posts each")
    print(f"test accuracy: raw weights {raw:.4f}, EMA weights {ema:.4f}")
    draw(history, args.png)
    print(f"wrote {args.png}")
    if min(raw, ema) < 0.85:
        sys.exit(f"the model did not learn (accuracy {raw:.3f} raw, {ema:.3f} EMA)")


def draw(history: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    metrics = [r["metrics"] or {} for r in history]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(steps, [m.get("loss") for m in metrics])  # type: ignore[union-attr]
    top.set_ylabel("loss (mean of 4 workers)")
    bottom.plot(steps, [m.get("grad_norm") for m in metrics], color="tab:orange")  # type: ignore[union-attr]
    bottom.set_ylabel("grad norm")
    bottom.set_xlabel("step (GET /v1/sessions/{id}/steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Train one torch MLP on scikit-learn's digits twice: with RemoteOptimizer and locally.

Both copies start from the same weights and see the same mini-batches. The local copy is
trained by torch.optim.AdamW, a warmup-then-cosine SequentialLR and torch's gradient
clipping; the remote copy by a RemoteOptimizer configured the same way, so the optimizer
state and the schedule live in an optserve session. The script prints both loss curves,
the largest parameter difference and the test accuracy, and exits non-zero unless the
runs agree (float64: to 1e-9) and the model learned.

    optserve serve &                     # or any running server
    python examples/digits_remote_vs_local.py --url http://127.0.0.1:8000

Needs torch and scikit-learn (``pip install -e "clients/python[torch]" scikit-learn``).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

try:
    from optserve_client.torch import RemoteOptimizer
except ImportError:  # run from a checkout without installing the client
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))
    from optserve_client.torch import RemoteOptimizer


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("OPTSERVE_API_KEY"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    tolerance = 1e-9 if args.dtype == "float64" else 1e-4

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.25, random_state=0
    )
    x_train, x_test = torch.tensor(x_train, dtype=dtype), torch.tensor(x_test, dtype=dtype)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    torch.manual_seed(0)
    local = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(dtype)
    remote = copy.deepcopy(local)

    batches_per_epoch = -(-len(x_train) // args.batch_size)
    total = args.epochs * batches_per_epoch
    warmup = max(1, total // 10)
    lr, betas, weight_decay, max_norm = 1e-2, (0.9, 0.99), 0.01, 1.0
    biases = [name for name, _ in remote.named_parameters() if name.endswith("bias")]

    # Local: torch.optim with a no-decay group for biases, warmup then cosine, clipping.
    local_opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in local.named_parameters() if n not in biases]},
            {"params": [p for n, p in local.named_parameters() if n in biases], "weight_decay": 0},
        ],
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
    )
    schedulers = torch.optim.lr_scheduler
    local_sched = schedulers.SequentialLR(
        local_opt,
        [
            schedulers.LinearLR(local_opt, start_factor=0.1, total_iters=warmup),
            schedulers.CosineAnnealingLR(local_opt, T_max=total - warmup),
        ],
        milestones=[warmup],
    )

    # Remote: the same, described as an optserve session.
    remote_opt = RemoteOptimizer(
        remote.named_parameters(),
        url=args.url,
        api_key=args.api_key,
        optimizer={"name": "AdamW", "lr": lr, "betas": list(betas), "weight_decay": weight_decay},
        schedule={
            "name": "SequentialLR",
            "schedulers": [
                {"name": "LinearLR", "start_factor": 0.1, "total_iters": warmup},
                {"name": "CosineAnnealingLR", "T_max": total - warmup},
            ],
            "milestones": [warmup],
        },
        param_groups=[{"params": biases, "weight_decay": 0.0}],
        clip_grad_norm={"max_norm": max_norm},
        dtype=args.dtype,
        labels={"example": "digits"},
    )

    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(1)
    print(f"session {remote_opt.session.id}: {total} steps, batch {args.batch_size}")
    print(f"{'epoch':>5} {'local loss':>12} {'remote loss':>12} {'lr':>10}")
    with remote_opt:
        for epoch in range(args.epochs):
            order = torch.randperm(len(x_train), generator=generator)
            local_sum = remote_sum = 0.0
            for start in range(0, len(x_train), args.batch_size):
                index = order[start : start + args.batch_size]
                x, y = x_train[index], y_train[index]

                local_opt.zero_grad()
                loss = loss_fn(local(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(local.parameters(), max_norm)
                local_opt.step()
                local_sched.step()
                local_sum += loss.item()

                remote_opt.zero_grad()
                loss = loss_fn(remote(x), y)
                loss.backward()
                remote_opt.step()
                remote_sum += loss.item()
            lr_now = remote_opt.param_groups[0]["lr"]
            print(
                f"{epoch:>5} {local_sum / batches_per_epoch:>12.6f} "
                f"{remote_sum / batches_per_epoch:>12.6f} {lr_now:>10.2e}"
            )
        remote_opt.session.delete()

    difference = max(
        (p - q).abs().max().item()
        for p, q in zip(local.parameters(), remote.parameters(), strict=True)
    )
    with torch.no_grad():
        local_accuracy = (local(x_test).argmax(1) == y_test).double().mean().item()
        remote_accuracy = (remote(x_test).argmax(1) == y_test).double().mean().item()
    print(f"largest parameter difference: {difference:.3e}")
    print(f"test accuracy: local {local_accuracy:.4f}, remote {remote_accuracy:.4f}")

    assert difference < tolerance, f"remote and local runs differ by {difference}"
    assert remote_accuracy > 0.9, f"the model did not learn (accuracy {remote_accuracy})"
    assert np.isclose(local_accuracy, remote_accuracy)


if __name__ == "__main__":
    main()

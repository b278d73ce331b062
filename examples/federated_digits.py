#!/usr/bin/env python
"""Federated learning on scikit-learn's digits through optserve: FedAvg vs FedAdam vs FedYogi.

Twenty simulated clients each hold a non-IID share of the training digits (label
proportions drawn from a Dirichlet distribution, so most clients see mostly a few
digits). For each server strategy the script creates one federated session holding a
softmax-regression model, then runs 30 rounds: in each, 10 sampled clients long-poll the
round's params, train locally for a few SGD steps, and submit their new params with their
number of examples; the server averages them, applies the strategy (Flower's FedAvg,
FedAdam or FedYogi) and opens the next round. Accuracy on held-out digits is measured
on the server's params after every round.

It prints the accuracy table, writes a PNG plot (by default docs/federated_digits.png, the
README's figure, wherever it is run from), and exits non-zero unless every
strategy learned and FedAvg's server params equal the weighted average of the clients'.

Then it attacks: 4 of the 20 clients send poisoned updates (their honest step, flipped
and scaled by 10), all 20 take part in every round, and the server aggregates with the
plain average (FedAvg) or a robust rule (FedMedian, Krum assuming 4 attackers,
FedTrimmedAvg cutting 20% of each tail). The second table and plot
(docs/federated_digits_poisoned.png) show the average wrecked and the robust rules
learning; it exits non-zero unless each robust rule ends well above FedAvg.

    python examples/federated_digits.py                      # starts its own server
    python examples/federated_digits.py --url http://127.0.0.1:8000 --plot out.png
    python examples/federated_digits.py --attack-rounds 0    # without the attack

Needs numpy, httpx, scikit-learn and matplotlib.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

CLIENTS = 20
PER_ROUND = 10
CLASSES = 10
FEATURES = 64
STRATEGIES: dict[str, dict[str, Any]] = {
    # Flower's names and meanings; eta is the server learning rate.
    "FedAvg": {"name": "FedAvg"},
    "FedAdam": {"name": "FedAdam", "eta": 0.03, "eta_l": 0.5, "tau": 1e-3},
    "FedYogi": {"name": "FedYogi", "eta": 0.03, "eta_l": 0.5, "tau": 1e-3},
}
ATTACKERS = frozenset(range(4))
"""Clients sending poisoned updates in the attack run."""
ATTACK_SCALE = -10.0
AGGREGATORS: dict[str, dict[str, Any]] = {
    "FedAvg": {"name": "FedAvg"},
    "FedMedian": {"name": "FedMedian"},
    "Krum": {"name": "Krum", "num_malicious_clients": len(ATTACKERS)},
    "FedTrimmedAvg": {"name": "FedTrimmedAvg", "beta": 0.2},
}
CLIENT_LR = 0.5
LOCAL_STEPS = 10
BATCH = 16


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running optserve (default: start one in memory mode)")
    parser.add_argument("--api-key", default=os.environ.get("OPTSERVE_API_KEY"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--plot",
        type=Path,
        # the README's figure, wherever the example is run from; not the working directory
        default=Path(__file__).resolve().parents[1] / "docs" / "federated_digits.png",
        help="where to write the PNG (default: docs/federated_digits.png, the README's figure)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--attack-rounds", type=int, default=20, help="rounds of the attack run (0: skip it)"
    )
    parser.add_argument(
        "--attack-plot",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "federated_digits_poisoned.png",
        help="where to write the attack run's PNG",
    )
    return parser.parse_args()


# -- a server of our own -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def own_server() -> Iterator[str]:
    """``python -m service serve`` in memory mode on a free loopback port, stopped by PID."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OPTSERVE_ACCESS_LOG": "false", "OPTSERVE_LOG_LEVEL": "warning"}
    env.pop("OPTSERVE_API_KEYS", None)
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "service", "serve", "--storage", "memory", "--port", str(port)]
    process = subprocess.Popen(command, cwd=repo, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with {process.returncode}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 60 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- data and model ------------------------------------------------------------------------------


def non_iid_split(
    y: np.ndarray, clients: int, rng: np.random.Generator, alpha: float = 0.3
) -> list[np.ndarray]:
    """Indices per client: each class spread over clients by Dirichlet(alpha) proportions."""
    shares: list[list[int]] = [[] for _ in range(clients)]
    for label in range(CLASSES):
        members = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(members)).astype(int)
        for client, part in enumerate(np.split(members, cuts[:-1])):
            shares[client].extend(part.tolist())
    return [np.array(sorted(s)) for s in shares]


def logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x @ params["w"] + params["b"]
    return out


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits(params, x), axis=1) == y))


def local_training(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A few steps of mini-batch SGD on the softmax cross-entropy, in float32."""
    w, b = params["w"].copy(), params["b"].copy()
    for _ in range(LOCAL_STEPS):
        batch = rng.choice(len(y), size=min(BATCH, len(y)), replace=False)
        z = x[batch] @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(batch)), y[batch]] -= 1.0
        p /= len(batch)
        w -= np.float32(CLIENT_LR) * (x[batch].T @ p)
        b -= np.float32(CLIENT_LR) * p.sum(axis=0)
    return {"w": w, "b": b}


# -- the federated run over HTTP --------------------------------------------------------------


def as_arrays(document: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in document["params"].items()}


def poisoned(current: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> dict[str, Any]:
    """An attacker's update: the honest step, flipped and scaled."""
    return {k: current[k] + np.float32(ATTACK_SCALE) * (trained[k] - current[k]) for k in current}


def run_strategy(
    http: httpx.Client,
    optimizer: dict[str, Any],
    data: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    rounds: int,
    seed: int,
    per_round: int = PER_ROUND,
    aggregator: dict[str, Any] | None = None,
    attackers: frozenset[int] = frozenset(),
) -> tuple[list[float], float]:
    """Accuracy before each round and after the last; the largest FedAvg check error
    (measured only without an aggregator and attackers)."""
    initial = np.random.default_rng(seed).normal(0, 0.01, (FEATURES, CLASSES))
    config = {
        "optimizer": optimizer,
        "params": {
            "w": {"shape": [FEATURES, CLASSES], "data": initial.ravel().tolist()},
            "b": {"shape": [CLASSES], "data": [0.0] * CLASSES},
        },
        "aggregation": {
            "mode": "rounds",
            "clients_per_round": per_round,
            "min_clients": per_round,
            "weighting": "num_examples",
            "aggregator": aggregator,
        },
        "labels": {"example": "federated_digits"},
    }
    created = http.post("/v1/sessions", json=config)
    created.raise_for_status()
    base = f"/v1/sessions/{created.json()['id']}"
    rng = np.random.default_rng(seed + 1)
    history: list[float] = []
    largest_error = 0.0
    try:
        for r in range(1, rounds + 1):
            # Long poll: answered at once when round r is open, else when it opens.
            fetched = http.get(base + "/round/params", params={"after": r - 1, "wait": 30})
            fetched.raise_for_status()
            assert fetched.json()["round"] == r, fetched.json()
            current = as_arrays(fetched.json())
            history.append(accuracy(current, *test))
            sent = []
            for client in sorted(rng.choice(CLIENTS, size=per_round, replace=False)):
                x, y = data[client]
                trained = local_training(current, x, y, rng)
                if client in attackers:
                    trained = poisoned(current, trained)
                body = {
                    "client_id": f"client-{client}",
                    "round": r,
                    "num_examples": len(y),
                    "params": {k: v.tolist() for k, v in trained.items()},
                }
                reply = http.post(base + "/updates", json=body)
                reply.raise_for_status()
                sent.append((trained, len(y)))
            assert reply.json()["round_closed"], reply.json()
            if optimizer["name"] == "FedAvg" and aggregator is None and not attackers:
                # FedAvg's new global params are the examples-weighted average.
                after = as_arrays(http.get(base + "/round/params").json())
                total = sum(n for _, n in sent)
                for name, values in after.items():
                    average = sum(p[name].astype(np.float64) * n for p, n in sent) / total
                    largest_error = max(largest_error, float(np.max(np.abs(values - average))))
        final = as_arrays(http.get(base + "/round/params").json())
        history.append(accuracy(final, *test))
        rounds_doc = http.get(base + "/rounds", params={"limit": 1000}).json()["rounds"]
        assert len(rounds_doc) == rounds and all(
            len(entry["participants"]) == per_round for entry in rounds_doc
        )
    finally:
        http.delete(base)
    return history, largest_error


def plot(results: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, history in results.items():
        ax.plot(range(len(history)), history, marker="o", markersize=3, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = arguments()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=args.seed, stratify=digits.target
    )
    split = non_iid_split(y_train, CLIENTS, np.random.default_rng(args.seed))
    data = [(x_train[i], y_train[i]) for i in split]
    sizes = [len(i) for i in split]
    print(f"{CLIENTS} clients, {min(sizes)} to {max(sizes)} examples each; {len(y_test)} test")

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    started = time.monotonic()
    results: dict[str, list[float]] = {}
    with (
        own_server() if args.url is None else nullcontext(args.url) as url,
        httpx.Client(base_url=url, headers=headers, timeout=60) as http,
    ):
        for name, optimizer in STRATEGIES.items():
            history, error = run_strategy(
                http, optimizer, data, (x_test, y_test), args.rounds, args.seed
            )
            results[name] = history
            if name == "FedAvg":
                print(f"FedAvg: largest difference from the weighted average {error:.2e}")
                assert error < 1e-5, error

        attacked: dict[str, list[float]] = {}
        for name, aggregator in AGGREGATORS.items() if args.attack_rounds > 0 else ():
            attacked[name], _ = run_strategy(
                http,
                {"name": "FedAvg"},
                data,
                (x_test, y_test),
                args.attack_rounds,
                args.seed,
                per_round=CLIENTS,
                aggregator=aggregator,
                attackers=ATTACKERS,
            )

    table(results, args.rounds)
    plot(results, args.plot, f"digits, {CLIENTS} non-IID clients, {PER_ROUND} per round")
    print(f"\nwrote {args.plot.resolve()}")
    for name, history in results.items():
        assert history[-1] > 0.8, f"{name} reached only {history[-1]:.3f}"
        assert history[-1] > history[0] + 0.5, f"{name} did not learn"
    if attacked:
        print(f"\n{len(ATTACKERS)} of {CLIENTS} clients poisoned (step x {ATTACK_SCALE:g}):")
        table(attacked, args.attack_rounds)
        title = f"digits, {len(ATTACKERS)} of {CLIENTS} clients poisoned, all in every round"
        plot(attacked, args.attack_plot, title)
        print(f"\nwrote {args.attack_plot.resolve()}")
        plain = attacked["FedAvg"][-1]
        for name, history in attacked.items():
            if name != "FedAvg":
                assert history[-1] > max(0.7, plain + 0.3), f"{name} under attack: {history[-1]}"
    print(f"{time.monotonic() - started:.1f} s")


def table(results: dict[str, list[float]], rounds: int) -> None:
    print()
    print("round  " + "  ".join(f"{name:>8}" for name in results))
    for r in range(rounds + 1):
        print(f"{r:5d}  " + "  ".join(f"{results[n][r]:8.3f}" for n in results))


if __name__ == "__main__":
    main()

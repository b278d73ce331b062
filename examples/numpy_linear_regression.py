#!/usr/bin/env python
"""Linear regression in plain numpy, optimized by an optserve session.

The data, the model and the gradient live here; the optimizer (Adam with a cosine
schedule) lives on the server. Each step sends the gradients of the mean squared error
and adds the returned deltas to the local weights. The script prints the loss as it
falls, and exits non-zero unless it recovers the true weights.

    optserve serve &                     # or any running server
    python examples/numpy_linear_regression.py --url http://127.0.0.1:8000 [--wire json]

Needs only numpy and the client (``pip install -e clients/python``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

try:
    from optserve_client import Client
except ImportError:  # run from a checkout without installing the client
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))
    from optserve_client import Client

FEATURES = 8
SAMPLES = 512


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("OPTSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("OPTSERVE_API_KEY"))
    parser.add_argument("--wire", choices=["safetensors", "json"], default="safetensors")
    parser.add_argument("--steps", type=int, default=300)
    return parser.parse_args()


def main() -> None:
    args = arguments()
    rng = np.random.default_rng(0)
    true_w = rng.uniform(-2, 2, FEATURES)
    true_b = 0.5
    x = rng.standard_normal((SAMPLES, FEATURES))
    y = x @ true_w + true_b + 0.01 * rng.standard_normal(SAMPLES)

    params = {"w": np.zeros(FEATURES), "b": np.zeros(())}
    with Client(args.url, api_key=args.api_key, wire=args.wire) as client:
        session = client.create_session(
            {"name": "Adam", "lr": 0.1},
            {name: value.shape for name, value in params.items()},
            schedule={"name": "CosineAnnealingLR", "T_max": args.steps, "eta_min": 1e-3},
            dtype="float64",
            labels={"example": "numpy-linear-regression"},
        )
        print(f"session {session.id} ({args.wire})")
        for step in range(args.steps):
            residual = x @ params["w"] + params["b"] - y
            loss = float(np.mean(residual**2))
            grads = {"w": 2 * x.T @ residual / SAMPLES, "b": np.array(2 * residual.mean())}
            result = session.step(grads, loss=loss)
            assert result.deltas is not None
            for name, delta in result.deltas.items():
                params[name] = params[name] + delta
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {result.step:>4}  loss {loss:.6f}  lr {result.lr[0]:.4f}")
        session.delete()

    error = max(np.abs(params["w"] - true_w).max(), abs(float(params["b"]) - true_b))
    print(f"largest weight error: {error:.2e}")
    assert loss < 1e-3, f"loss {loss} did not fall"
    assert error < 1e-2, f"weights are off by {error}"


if __name__ == "__main__":
    main()

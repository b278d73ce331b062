"""Record Flower's strategies on every scenario, for CI without flwr.

Run ``python -m tests.core.make_flower_fixtures [scenario-id ...]`` with flwr installed
(``pip install flwr``). Each scenario gets ``fixtures/flower/<id>.npz`` (the initial
params, every client result, the global params after each round); ``index.json`` records
the scenario definitions, the flwr version and each strategy's defaults, so a test
notices a scenario edited without regenerating its fixture.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.core.flower_scenarios import (
    FIXTURES,
    INDEX,
    SCENARIOS,
    describe,
    flower_defaults,
    load_index,
    run_flower,
)


def main(argv: list[str]) -> None:
    import importlib

    flwr = importlib.import_module("flwr")

    wanted = set(argv) or set(SCENARIOS)
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    index = load_index()
    scenarios = {k: v for k, v in index.get("scenarios", {}).items() if k in SCENARIOS}
    for sid in sorted(wanted):
        trace = run_flower(SCENARIOS[sid])
        np.savez_compressed(FIXTURES / f"{sid}.npz", allow_pickle=False, **trace.arrays())
        scenarios[sid] = describe(SCENARIOS[sid])
        print(f"wrote {FIXTURES / sid}.npz: {len(trace.globals)} rounds")
    index = {
        "flwr": flwr.__version__,
        "defaults": flower_defaults(),
        "scenarios": dict(sorted(scenarios.items())),
    }
    INDEX.write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Record torch.optim.LBFGS's closure calls for every LBFGS scenario, for torch-less CI.

Run ``python -m tests.core.make_lbfgs_fixtures [scenario-id ...]`` with torch==2.13.0
installed. Each scenario gets ``fixtures/lbfgs/<id>.npz`` (every point at which torch
called the closure, where each ``step()`` returned, the parameters and the func_evals /
n_iter counters after each step); ``index.json`` records the scenario definitions, so a
test notices a scenario edited without regenerating its fixture.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tests.core.lbfgs_scenarios import FIXTURES, SCENARIOS, describe, run_torch

INDEX = FIXTURES / "index.json"


def main(argv: list[str]) -> None:
    import torch

    wanted = set(argv) or set(SCENARIOS)
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    index = json.loads(INDEX.read_text()) if INDEX.exists() else {}
    index = {k: v for k, v in index.items() if k in SCENARIOS}
    for sid in sorted(wanted):
        scenario = SCENARIOS[sid]
        trace = run_torch(scenario)
        np.savez_compressed(FIXTURES / f"{sid}.npz", **trace.arrays())
        index[sid] = {**describe(scenario), "torch": torch.__version__}
        print(f"wrote {FIXTURES / sid}.npz: {len(trace.points)} closure calls")
    INDEX.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])

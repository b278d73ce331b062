"""Write torch's outcome for every group-change scenario, for test runs without torch.

Run from the repository root with torch==2.13.0 installed:

    python -m tests.core.make_group_change_fixtures [scenario-id ...]

Each fixture holds the scenario's description (so a changed scenario shows up as a stale
fixture) and torch's outcome: the snapshots and, where torch raised, the step and error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.core.group_change_scenarios import SCENARIOS, Scenario, run_torch

FIXTURES = Path(__file__).parent / "fixtures" / "schedule_group_changes"


def fixture_path(sc: Scenario) -> Path:
    return FIXTURES / f"{sc.id}.json"


def load(sc: Scenario) -> dict[str, Any]:
    with fixture_path(sc).open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def write(sc: Scenario) -> Path:
    import torch

    FIXTURES.mkdir(parents=True, exist_ok=True)
    data = {"scenario": sc.describe(), "torch": torch.__version__, "outcome": run_torch(sc)}
    path = fixture_path(sc)
    path.write_text(json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n")
    return path


def main(argv: list[str]) -> None:
    wanted = set(argv)
    unknown = wanted - {sc.id for sc in SCENARIOS}
    if unknown:
        raise SystemExit(f"unknown scenario ids: {', '.join(sorted(unknown))}")
    for sc in SCENARIOS:
        if not wanted or sc.id in wanted:
            print(f"wrote {write(sc)}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""Golden parity fixtures: torch's final parameters per case, committed for torch-less CI.

Regenerate with ``python -m tests.core.golden`` (needs torch==2.13.0; the cases of
``cases/beyond_torch.py`` and ``cases/soap.py`` also need their reference packages, the
``reference-optimizers`` extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests.core.cases import Case, all_cases
from tests.core.parity_inputs import make_inputs
from tests.core.torch_reference import run_torch

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


def fixture_path(case: Case) -> Path:
    return FIXTURES / f"{case.id}.npz"


def load(case: Case) -> dict[str, np.ndarray]:
    with np.load(fixture_path(case)) as data:
        return {name: data[name] for name in data.files}


def write(case: Case) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(fixture_path(case), **run_torch(case.config, make_inputs(case)))


def main(argv: list[str]) -> None:
    wanted = set(argv)
    for case in all_cases():
        if not wanted or case.id in wanted:
            write(case)
            print(f"wrote {fixture_path(case)}")


if __name__ == "__main__":
    main(sys.argv[1:])

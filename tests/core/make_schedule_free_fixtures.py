"""Record the schedulefree package's evaluation points and group scalars, for CI without it.

Run ``python -m tests.core.make_schedule_free_fixtures`` with torch==2.13.0 and the test
extra installed; it writes ``fixtures/schedule_free/<case-id>.npz`` for every schedule-free
case of ``tests/core/cases/beyond_torch.py`` on one group (the parameters themselves are
in the golden parity fixtures, ``python -m tests.core.golden``).
"""

from __future__ import annotations

import numpy as np

from tests.core.schedule_free_reference import EVAL_CASES, FIXTURES, fixture_path, run_package


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case in EVAL_CASES:
        np.savez_compressed(fixture_path(case), **run_package(case))
        print(f"wrote {fixture_path(case)}")


if __name__ == "__main__":
    main()

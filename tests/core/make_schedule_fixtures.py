"""Write torch's lr sequences for every schedule sequence, for test runs without torch.

Run from the repository root with torch==2.13.0 installed:

    python -m tests.core.make_schedule_fixtures [sequence-id ...]

Each fixture holds the sequence's description (so a changed sequence shows up as a
stale fixture) and torch's trace, constant columns folded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.core.schedule_sequences import SEQUENCES, Sequence, compress, run_torch

FIXTURES = Path(__file__).parent / "fixtures" / "schedules"


def fixture_path(seq: Sequence) -> Path:
    return FIXTURES / f"{seq.id}.json"


def load(seq: Sequence) -> dict[str, Any]:
    with fixture_path(seq).open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def write(seq: Sequence) -> Path:
    import torch

    FIXTURES.mkdir(parents=True, exist_ok=True)
    data = {
        "sequence": seq.describe(),
        "torch": torch.__version__,
        "trace": compress(run_torch(seq)),
    }
    path = fixture_path(seq)
    path.write_text(json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n")
    return path


def main(argv: list[str]) -> None:
    wanted = set(argv)
    unknown = wanted - {seq.id for seq in SEQUENCES}
    if unknown:
        raise SystemExit(f"unknown sequence ids: {', '.join(sorted(unknown))}")
    for seq in SEQUENCES:
        if not wanted or seq.id in wanted:
            print(f"wrote {write(seq)}")


if __name__ == "__main__":
    main(sys.argv[1:])

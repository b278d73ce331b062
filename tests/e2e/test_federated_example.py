"""examples/federated_digits.py runs end to end (starting its own server) and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federated_digits.py"


def test_federated_digits_example(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    plot, attacked = tmp_path / "digits.png", tmp_path / "poisoned.png"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--plot", str(plot), "--attack-plot", str(attacked)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    header = lines.index("round    FedAvg   FedAdam   FedYogi")
    table = [line.split() for line in lines[header + 1 : header + 32]]
    assert [int(row[0]) for row in table] == list(range(31))
    final = [float(value) for value in table[-1][1:]]
    assert all(0.8 < value <= 1.0 for value in final)
    assert plot.read_bytes().startswith(b"\x89PNG")
    # The attack run: the plain average is wrecked, every robust rule learns.
    header = lines.index("round    FedAvg  FedMedian      Krum  FedTrimmedAvg")
    table = [line.split() for line in lines[header + 1 : header + 22]]
    assert [int(row[0]) for row in table] == list(range(21))
    plain, *robust = (float(value) for value in table[-1][1:])
    assert all(value > max(0.7, plain + 0.3) for value in robust)
    assert attacked.read_bytes().startswith(b"\x89PNG")

"""The numpy/BLAS configuration a server reports at start, pinned and not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.core import machine

REPO = Path(__file__).resolve().parents[2]


def _describe(changes: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in machine.REPLICA_ENVIRONMENT}
    env.update(changes, PYTHONPATH=str(REPO))
    code = "import json; from service.core import machine; print(json.dumps(machine.describe()))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_the_pinned_environment_is_what_numpy_and_openblas_run_with() -> None:
    pinned = _describe(machine.REPLICA_ENVIRONMENT)
    assert pinned["replica_environment"] is True
    assert pinned["environment"] == machine.REPLICA_ENVIRONMENT
    disabled = set(machine.REPLICA_ENVIRONMENT["NPY_DISABLE_CPU_FEATURES"].split())
    assert not disabled & set(pinned["simd"]["dispatched"])
    if pinned["blas"].get("coretype") is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS that reports its kernels")
    assert pinned["blas"]["coretype"] == "Haswell"
    assert pinned["blas"]["threads"] == 1


def test_an_unpinned_process_says_so() -> None:
    plain = _describe({})
    assert plain["replica_environment"] is False
    assert set(plain["environment"].values()) == {None}
    assert plain["numpy"] and plain["blas"]["name"]


def test_the_image_and_the_compose_replicas_set_the_pinned_environment() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    compose = (REPO / "deploy" / "compose.yml").read_text()
    for name, value in machine.REPLICA_ENVIRONMENT.items():
        assert f"{name}={value}" in dockerfile or f'{name}="{value}"' in dockerfile, name
        assert f"{name}: {value}" in compose or f'{name}: "{value}"' in compose, name

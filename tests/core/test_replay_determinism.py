"""Replays on another machine give the acknowledged numbers (docs/storage.md).

A second machine is emulated by subprocesses that change what numpy and OpenBLAS choose
at run time: numpy's SIMD level, OpenBLAS's kernel set and thread count, glibc's math
variants, and optserve's own kernel thread count. Each runs
:mod:`tests.core.replay_digest` and the digests of every state array and parameter must
equal the reference process's.

- Core's own numbers (every session but Muon's larger ones) must agree under every
  variation, pinned environment or not.
- Muon's matrix products above torch's reference-GEMM size, and SOAP's products and
  LAPACK bases, go to OpenBLAS, whose result depends on its kernel set and thread count:
  they agree under the replicas' pinned environment (``machine.REPLICA_ENVIRONMENT``),
  whatever else varies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from service.core import machine

REPO = Path(__file__).resolve().parents[2]

# Every session at 1k and 300k elements; at 3M (split over kernel threads, BLAS threads
# used for dot products) the cheaper ones: Muon and LBFGS at 3M cost seconds each.
SELECTION = (
    "*/1k/*",
    "*/300k/*",
    *(
        f"{name}/3M/*"
        for name in ("adam", "sgd-clip2", "adafactor", "radam", "nadam", "rmsprop-centered")
    ),
)
PINNED_ONLY = ("muon/300k/", "muon/3M/", "soap/")
"""Sessions whose digests depend on OpenBLAS's kernel set and thread count: equal only
under the pinned environment (SOAP's matrix products and LAPACK bases at every size)."""

_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES")


GLIBC_WITHOUT_FMA = "glibc.cpu.hwcaps=-AVX2,-FMA,-AVX512F"
"""glibc's libm picks FMA variants of exp, log, pow, sin... on CPUs that have FMA."""

UNPINNED: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "one BLAS thread": ({"OPENBLAS_NUM_THREADS": "1"}, ()),
    "OpenBLAS Haswell kernels": ({"OPENBLAS_CORETYPE": "Haswell"}, ()),
    "OpenBLAS Sandybridge kernels": ({"OPENBLAS_CORETYPE": "Sandybridge"}, ()),
    "numpy at its baseline SIMD level": (
        {"NPY_DISABLE_CPU_FEATURES": " ".join(machine.numpy_dispatch())},
        (),
    ),
    "one kernel thread": ({}, ("--core-threads", "1")),
}
PINNED_VARIATIONS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "one kernel thread": ({}, ("--core-threads", "1")),
    "four kernel threads": ({}, ("--core-threads", "4")),
    "glibc without FMA": ({"GLIBC_TUNABLES": GLIBC_WITHOUT_FMA}, ()),
}


def _run(changes: Mapping[str, str], args: Sequence[str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in _VARIABLES and k != "GLIBC_TUNABLES"}
    env.update(changes)
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "tests.core.replay_digest", *args]
    for pattern in SELECTION:
        command += ["--match", pattern]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@cache
def _results() -> dict[str, dict[str, Any]]:
    """Every subprocess of this module, two at a time (they are mostly single-threaded)."""
    runs: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {"reference": ({}, ())}
    runs.update({f"unpinned: {k}": v for k, v in UNPINNED.items()})
    pinned = dict(machine.REPLICA_ENVIRONMENT)
    runs["pinned"] = (pinned, ())
    runs.update({f"pinned: {k}": ({**pinned, **e}, a) for k, (e, a) in PINNED_VARIATIONS.items()})
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, env, args) for name, (env, args) in runs.items()}
        return {name: f.result() for name, f in futures.items()}


def _differences(
    reference: Mapping[str, Any], other: Mapping[str, Any], skip: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Session id -> the arrays whose digests differ."""
    out = {}
    assert reference.keys() == other.keys()
    for key, arrays in reference.items():
        if key.startswith(tuple(skip)):
            continue
        differ = [name for name, value in arrays.items() if other[key][name] != value]
        if differ:
            out[key] = differ
    return out


pytestmark = pytest.mark.skipif(
    not machine.numpy_dispatch(), reason="numpy was built without run-time SIMD dispatch"
)


@pytest.mark.parametrize("variation", list(UNPINNED))
def test_cores_own_numbers_do_not_depend_on_the_machine(variation: str) -> None:
    results = _results()
    reference, other = results["reference"], results[f"unpinned: {variation}"]
    assert _differences(reference["digests"], other["digests"], skip=PINNED_ONLY) == {}


@pytest.mark.parametrize("variation", list(PINNED_VARIATIONS))
def test_every_session_replays_alike_in_the_pinned_environment(variation: str) -> None:
    results = _results()
    pinned, other = results["pinned"], results[f"pinned: {variation}"]
    assert pinned["environment"]["replica_environment"]
    assert pinned["environment"]["blas"].get("coretype") in (None, "Haswell")
    assert _differences(pinned["digests"], other["digests"]) == {}


def test_the_pinned_environment_changes_no_number_of_cores_own() -> None:
    """Pinning is invisible where core does not depend on it: a replica pinned after the
    fact replays sessions stepped before the pin to the same state."""
    results = _results()
    reference, pinned = results["reference"]["digests"], results["pinned"]["digests"]
    assert _differences(reference, pinned, skip=PINNED_ONLY) == {}


def test_the_digests_see_every_array() -> None:
    """The comparison can fail: the digests cover parameters, state arrays and JSON state."""
    digests = _results()["reference"]["digests"]
    adam = digests["adam/1k/float32"]
    assert {"param/w", "param/b", "state/group0/exp_avg.0", "meta"} <= adam.keys()
    assert len({d["param/w"] for d in digests.values()}) == len(digests)

"""What numpy and BLAS run with in this process, for comparing replicas.

Replicas replay each other's sessions, so they must compute the same bits (docs/storage.md,
"Replays across machines"). Core's own reductions are machine independent; what is left
to the environment is which SIMD loops numpy dispatches to and which OpenBLAS kernel and
thread count Muon's matrix products run on. ``REPLICA_ENVIRONMENT`` is the setting that
makes those the same on every x86-64-v3 machine; the server logs :func:`describe` at start
so that an operator can compare replicas line by line.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from service.core import native

REPLICA_ENVIRONMENT: dict[str, str] = {
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
"""Read when numpy is first imported, so set before the process starts (the Dockerfile
does). Haswell is OpenBLAS's AVX2/FMA kernel set and X86_V4 numpy's (2.4 and later)
AVX-512 level: with these, every x86-64-v3 CPU runs the same loops and kernels. OpenBLAS
splits a product's inner dimension differently with another thread count, so it is pinned
to one."""

_CORENAME_SYMBOLS = (
    "scipy_openblas_get_corename64_",
    "scipy_openblas_get_corename",
    "openblas_get_corename64_",
    "openblas_get_corename",
)
_THREADS_SYMBOLS = (
    "scipy_openblas_get_num_threads64_",
    "scipy_openblas_get_num_threads",
    "openblas_get_num_threads64_",
    "openblas_get_num_threads",
)


def _openblas() -> ctypes.CDLL | None:
    """numpy's bundled OpenBLAS (already loaded: opening it again returns that copy)."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*.so*")) if libs.is_dir() else ():
        try:
            return ctypes.CDLL(str(path))
        except OSError:
            continue
    return None


def _call(lib: ctypes.CDLL, names: tuple[str, ...], restype: Any) -> Any:
    for name in names:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = restype
            return fn()
    return None


def blas() -> dict[str, Any]:
    """numpy's BLAS: its build (name, version) and, for OpenBLAS, the kernel set and
    thread count it picked at run time."""
    config: Any = np.show_config(mode="dicts")
    build = config.get("Build Dependencies", {}).get("blas", {})
    info: dict[str, Any] = {"name": build.get("name"), "version": build.get("version")}
    lib = _openblas()
    if lib is not None:
        core = _call(lib, _CORENAME_SYMBOLS, ctypes.c_char_p)
        info["coretype"] = core.decode() if isinstance(core, bytes) else None
        info["threads"] = _call(lib, _THREADS_SYMBOLS, ctypes.c_int)
    return info


def _umath() -> Any:
    try:
        return importlib.import_module("numpy._core._multiarray_umath")
    except ImportError:  # numpy 1.x
        return importlib.import_module("numpy.core._multiarray_umath")


def numpy_dispatch() -> list[str]:
    """The SIMD levels numpy was built to dispatch to at run time, found or not."""
    return list(_umath().__cpu_dispatch__)


def simd() -> dict[str, Any]:
    """numpy's SIMD levels: built in, and found (and not disabled) on this CPU."""
    umath = _umath()
    features: dict[str, bool] = umath.__cpu_features__
    dispatch = numpy_dispatch()
    return {
        "baseline": list(umath.__cpu_baseline__),
        "dispatched": [f for f in dispatch if features.get(f)],
        "not_dispatched": [f for f in dispatch if not features.get(f)],
    }


def describe() -> dict[str, Any]:
    """Everything a replay's last bits depend on besides optserve's own code."""
    environment = {name: os.environ.get(name) for name in REPLICA_ENVIRONMENT}
    return {
        "numpy": np.__version__,
        "simd": simd(),
        "blas": blas(),
        "environment": environment,
        "replica_environment": environment == REPLICA_ENVIRONMENT,
        # The same bits either way (service/core/native.py): shown for speed, not replays.
        "native_kernels": native.kernels is not None,
    }

"""Run codec work for large payloads on worker threads, small ones inline.

Parsing or formatting megabytes of tensors would stall the event loop (and every other
session's requests) for milliseconds to seconds; a thread hop costs tens of microseconds,
more than the whole codec work for small tensors. The threshold splits the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

OFFLOAD_BYTES = 256 * 1024

P = ParamSpec("P")
T = TypeVar("T")


async def by_size(size: int, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)``, on a worker thread when ``size`` bytes are at stake."""
    if size < OFFLOAD_BYTES:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)


def tensor_bytes(tensors: Mapping[str, np.ndarray] | None) -> int:
    """Rough payload size of a tensor dict (arrays' nbytes), 0 for None."""
    if not tensors:
        return 0
    return sum(a.nbytes for a in tensors.values())

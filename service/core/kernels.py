"""Blocked, multi-threaded execution of elementwise optimizer updates.

An optimizer step is a dozen elementwise passes over each tensor. Done as whole-array
numpy expressions, every pass streams the full tensor through memory and allocates a
full-size temporary. Running all passes over one cache-sized block before moving to the
next keeps the data in L2, and the only temporaries are a few block-sized scratch buffers
per thread. numpy releases the GIL inside ufuncs, so the blocks of a large tensor are
shared between the calling thread and a small pool, each taking the next block when it
is free. Whether threads pay off depends on the kernel's weight and the tensor's size;
the thresholds below were measured on the 2-core development machine with
``bench/core_step.py``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 1 << 16
"""Elements per block on one thread: 256 KiB of float32 per array, so a kernel's arrays
and scratch stay in a 2 MiB L2 between its passes."""

PARALLEL_BLOCK = 1 << 18
"""Elements per block when threads share a tensor. Larger than ``BLOCK``: between ufunc
calls the threads hand the GIL back and forth, so fewer, longer calls measured faster
(1M-element Adam, RMSprop, Adagrad on 2 threads: 10-15% over 64K blocks; 10M: even)."""

PARALLEL_MIN = 2 * PARALLEL_BLOCK
"""Tensors smaller than this run on the calling thread: two blocks at least to share."""

PARALLEL_MIN_WORK = 4_000_000
"""Elements times ufunc passes below which a tensor runs on the calling thread.

Waking a pool thread costs tens of microseconds here, and two threads contend for the
GIL between ufunc calls, so threads pay off for heavy kernels or large tensors: on 2
cores, 1M-element SGD with momentum (3 passes) ran as fast on one thread as on two,
Adagrad (6), RMSprop (8) and Adam (11) 10-20% faster on two, every kernel at 10M
elements 20-50% faster on two."""

_threads = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()

Kernel = Callable[..., None]


def set_threads(count: int) -> None:
    """Set how many threads large tensors are split over (1 disables the pool)."""
    global _threads, _pool
    if count < 1:
        raise ValueError(f"thread count must be >= 1, got {count}")
    with _pool_lock:
        _threads = count
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def thread_count() -> int:
    """How many threads large tensors are split over."""
    return _threads


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, _threads - 1), thread_name_prefix="optserve-core"
            )
        return _pool


def scratch(count: int, dtype: np.dtype[np.floating], size: int) -> list[np.ndarray]:
    """Block-sized scratch buffers owned by the calling thread, reused across steps."""
    key = (np.dtype(dtype).str, count, size)
    cache: dict[tuple[str, int, int], list[np.ndarray]] | None = getattr(_local, "cache", None)
    if cache is None:
        cache = {}
        _local.cache = cache
    bufs = cache.get(key)
    if bufs is None:
        bufs = [np.empty(size, dtype=dtype) for _ in range(count)]
        cache[key] = bufs
    return bufs


class _BlockQueue:
    """Hands out block start offsets to whichever thread asks next.

    Threads pull blocks instead of taking fixed shares, so a worker that wakes late (a
    thread wake-up costs tens of microseconds on a virtual machine) or shares its core
    with another process simply takes fewer blocks, and nobody waits on a straggler.
    """

    def __init__(self, n: int, block: int) -> None:
        self._starts = iter(range(0, n, block))
        self._lock = threading.Lock()

    def next(self) -> int | None:
        with self._lock:
            return next(self._starts, None)


def _run_blocks(
    kernel: Kernel,
    flats: Sequence[np.ndarray | None],
    n_scratch: int,
    dtype: np.dtype[np.floating],
    n: int,
    block: int,
    queue: _BlockQueue | None,
) -> None:
    bufs = scratch(n_scratch, dtype, block) if n_scratch else []
    starts = range(0, n, block) if queue is None else iter(queue.next, None)
    for lo in starts:
        hi = min(lo + block, n)
        size = hi - lo
        kernel(*(None if a is None else a[lo:hi] for a in flats), *(b[:size] for b in bufs))


def elementwise(
    kernel: Kernel,
    arrays: Sequence[np.ndarray | None],
    n_scratch: int = 0,
    passes: int = 8,
) -> None:
    """Apply ``kernel`` block by block to aligned arrays of the same size.

    ``kernel`` receives one view per array, then ``n_scratch`` scratch views of the same
    length, and updates its output views in place. Arrays must be C-contiguous so that the
    flat views alias the originals. A ``None`` entry (state a variant does not keep) is
    passed to the kernel as ``None``, so one kernel signature serves every variant.
    ``passes`` is about how many ufunc calls the kernel makes per block: its weight,
    which decides whether threads are worth waking (see ``PARALLEL_MIN_WORK``).
    """
    flats: list[np.ndarray | None] = []
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError("elementwise kernels need C-contiguous arrays")
        flats.append(None if a is None else a.reshape(-1))
    present = [a for a in flats if a is not None]
    n = present[0].size
    dtype = present[0].dtype
    if n < PARALLEL_MIN or n * passes < PARALLEL_MIN_WORK or _threads == 1:
        _run_blocks(kernel, flats, n_scratch, dtype, n, BLOCK, None)
        return
    queue = _BlockQueue(n, PARALLEL_BLOCK)
    args = (kernel, flats, n_scratch, dtype, n, PARALLEL_BLOCK, queue)
    futures = [_executor().submit(_run_blocks, *args) for _ in range(_threads - 1)]
    try:
        _run_blocks(*args)  # the caller works too, from the first block on
    finally:
        for f in futures:
            # A helper that has not started yet (still waking, or busy with another
            # session's tensor) is not waited for: the caller has done its blocks.
            if not f.cancel():
                f.result()


# Block-level building blocks. Each mirrors one of torch's in-place tensor ops, in torch's
# order of floating-point operations, so kernels built from them round like torch does.
# Scalars may be Python floats or, faster, 0-d arrays made once per step by `constants`.

Scalar = float | np.ndarray


def constants(dtype: np.dtype[Any], *values: float) -> tuple[np.ndarray, ...]:
    """Python floats as 0-d arrays of ``dtype``, for use as ufunc operands in kernels.

    A Python float operand is rounded to the array's dtype on every ufunc call (NEP 50);
    converting once per step gives the same value and saves that work on every block.
    """
    with np.errstate(all="ignore"):  # a float32 overflow to inf is the same either way
        return tuple(np.array(v, dtype=dtype) for v in values)


def signed_grad(
    g: np.ndarray,
    p: np.ndarray | None,
    weight_decay: Scalar,
    maximize: bool,
    buf: np.ndarray,
) -> tuple[np.ndarray, float]:
    """torch's ``grad = -grad if maximize; grad = grad.add(param, alpha=weight_decay)``.

    ``p`` is ``None`` when there is no (coupled) weight decay. Returns ``(array, sign)``
    with ``sign * array`` the effective gradient. Without weight decay the sign is left
    for the caller to fold into its scalars (negation is exact, so this saves a pass);
    with weight decay ``buf`` receives ``wd * p ± g`` and the sign is 1.
    """
    if p is None:
        return g, -1.0 if maximize else 1.0
    np.multiply(p, weight_decay, out=buf)
    if maximize:
        np.subtract(buf, g, out=buf)
    else:
        np.add(buf, g, out=buf)
    return buf, 1.0


@dataclass(frozen=True)
class Lerp:
    """torch's ``lerp_`` with a scalar weight, both of its formulas, in the tensor dtype.

    torch computes ``self + w (end - self)`` when ``|w| < 0.5`` and otherwise
    ``end - (end - self)(1 - w)``, with ``w`` and ``1 - w`` in the tensor's dtype.
    """

    weight: np.ndarray
    complement: np.ndarray
    small: bool

    @classmethod
    def of(cls, weight: float, dtype: np.dtype[Any]) -> Lerp:
        (w,) = constants(dtype, weight)
        return cls(w, np.subtract(1, w), bool(abs(w) < 0.5))

    def apply_(self, avg: np.ndarray, g: np.ndarray, sign: float, buf: np.ndarray) -> None:
        """``avg.lerp_(sign * g, weight)``; negating g is exact, so the sign costs nothing."""
        if self.small:
            if sign < 0:  # avg + w (-g - avg) == avg - w (g + avg)
                np.add(g, avg, out=buf)
                np.multiply(buf, self.weight, out=buf)
                np.subtract(avg, buf, out=avg)
            else:
                np.subtract(g, avg, out=buf)
                np.multiply(buf, self.weight, out=buf)
                np.add(avg, buf, out=avg)
        elif sign < 0:  # -g - (-g - avg)(1 - w) == (g + avg)(1 - w) - g
            np.add(g, avg, out=buf)
            np.multiply(buf, self.complement, out=buf)
            np.subtract(buf, g, out=avg)
        else:
            np.subtract(g, avg, out=buf)
            np.multiply(buf, self.complement, out=buf)
            np.subtract(g, buf, out=avg)


def decay_add_square_(
    avg: np.ndarray, g: np.ndarray, beta: Scalar, one_minus_beta: Scalar, buf: np.ndarray
) -> None:
    """``avg.mul_(beta).addcmul_(g, g, value=1 - beta)``: ``beta avg + ((1 - beta) g) g``."""
    np.multiply(g, one_minus_beta, out=buf)
    np.multiply(buf, g, out=buf)
    np.multiply(avg, beta, out=avg)
    np.add(avg, buf, out=avg)

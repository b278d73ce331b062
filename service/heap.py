"""Fixed glibc allocator thresholds, so a step's large buffers are reused, not refaulted.

By default glibc serves a large ``malloc`` with a fresh ``mmap`` and returns it with
``munmap`` on ``free``, and trims the top of its heap whenever more than a threshold is
free. A server that takes a few MB in and sends a few MB out per step then gives its
buffers back to the kernel after every step and page-faults them in again on the next:
that churn cost more than the copies themselves (a 12 MB three-buffer shuffle took 2.2 ms
with the default thresholds, 0.5 ms with these). Fixed thresholds keep freed buffers in
the heap for the next step; the cost is that the server's resident memory stays at its
high-water mark instead of shrinking between bursts.

glibc caps the mmap threshold at 32 MiB on 64-bit machines, so buffers above it (a 10M
float32 tensor) would still be mapped per use: a step's body and deltas come from
:mod:`service.buffers`, which reuses them itself. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
"""glibc's largest allowed value (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top kept for reuse before glibc gives it back."""

log = logging.getLogger("optserve")


def keep_large_buffers() -> bool:
    """Set the thresholds where the C library is glibc; True if it took them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (or no C library found): nothing to tune
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    took = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    took = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and took
    if not took:
        log.debug("mallopt refused the allocator thresholds; keeping the defaults")
    return took

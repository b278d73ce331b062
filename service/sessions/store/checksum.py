"""The checksum of everything the disk store writes: xxHash's XXH3, 64 bits.

It is not cryptographic (it guards against disks, not adversaries) and it is fast: about
25 GB/s on one core, so checksumming a step's 4 MB of gradients costs about 0.15 ms,
five times less than ``zlib.crc32``. It is computed incrementally over the buffers of a
record, so nothing is copied to checksum it.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

SIZE = 8
"""Bytes of a checksum."""


def digest(buffers: Iterable[bytes | memoryview]) -> int:
    """The checksum of the buffers' bytes, concatenated."""
    h = xxhash.xxh3_64()
    for buffer in buffers:
        h.update(buffer)
    return h.intdigest()


def hexdigest(data: bytes | memoryview) -> str:
    """The checksum of ``data`` as 16 hex digits."""
    return f"{digest([data]):016x}"

"""Session ids: 26 lowercase Crockford base32 characters that sort by creation time.

48 bits of milliseconds then 80 random bits (the ULID layout). Within one millisecond
the random part counts up, so ids made by one process are strictly increasing, which is
what lets a session list be paginated by id.
"""

from __future__ import annotations

import re
import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
PATTERN = re.compile(r"[0-9a-hjkmnp-tv-z]{26}")

_lock = threading.Lock()
_last = (0, 0)


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_id(now: float | None = None) -> str:
    global _last
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        last_ms, last_rand = _last
        if ms <= last_ms:
            ms, rand = last_ms, last_rand + 1
        else:
            rand = secrets.randbits(80)
        _last = (ms, rand)
    return _encode(ms, 10) + _encode(rand & ((1 << 80) - 1), 16)


def is_valid(session_id: str) -> bool:
    return PATTERN.fullmatch(session_id) is not None

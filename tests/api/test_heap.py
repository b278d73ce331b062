"""The allocator thresholds: set where the C library is glibc, a no-op elsewhere."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from service import heap


def test_glibc_takes_the_thresholds() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert heap.keep_large_buffers()


def test_without_glibc_nothing_is_set_and_nothing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnot-a-libc.so.404")
    assert heap.keep_large_buffers() is False

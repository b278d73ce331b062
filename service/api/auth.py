"""Bearer API keys mapped to tenants.

Keys are compared through their SHA-256 digests: the lookup's timing depends on the digest,
not on how many leading characters of a real key a guess got right.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

OPEN_TENANT = "default"
"""The one tenant of a server with no keys configured."""


class KeyFileError(ValueError):
    """The configured keys are malformed (raised at startup, never per request)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key_pairs(entries: Iterable[str], source: str) -> dict[str, str]:
    """``tenant:key`` entries -> {key: tenant}. Blank entries and ``#`` comments are skipped."""
    keys: dict[str, str] = {}
    for number, raw in enumerate(entries, start=1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        tenant, key = tenant.strip(), key.strip()
        if not sep or not tenant or not key:
            raise KeyFileError(f"{source} entry {number} is not 'tenant:key'")
        if key in keys and keys[key] != tenant:
            raise KeyFileError(f"{source} entry {number}: a key is given to two tenants")
        keys[key] = tenant
    return keys


class KeyTable:
    """Resolves a bearer key to its tenant; empty means the server is open."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._tenants = {_digest(key): tenant for key, tenant in keys.items()}

    @classmethod
    def from_settings(cls, api_keys: str, api_keys_file: Path | None) -> KeyTable:
        keys = parse_key_pairs(api_keys.split(","), "OPTSERVE_API_KEYS")
        if api_keys_file is not None:
            try:
                lines = api_keys_file.read_text().splitlines()
            except OSError as exc:
                raise KeyFileError(f"cannot read keys file {api_keys_file}: {exc}") from exc
            for key, tenant in parse_key_pairs(lines, str(api_keys_file)).items():
                if keys.get(key, tenant) != tenant:
                    raise KeyFileError("a key is given to two tenants")
                keys[key] = tenant
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self._tenants

    def tenant_for(self, key: str) -> str | None:
        return self._tenants.get(_digest(key))

"""The PostgreSQL store (``OPTSERVE_STORAGE=postgres``): needs the ``postgres`` extra."""

from __future__ import annotations

from service.sessions.store.postgres.store import PostgresStore, check_reachable

__all__ = ["PostgresStore", "check_reachable"]

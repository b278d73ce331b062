"""The PostgreSQL schema, as numbered migrations applied when a store opens.

``optserve_schema`` records which migrations ran. Opening takes a transaction-scoped
advisory lock first, so replicas starting together migrate one at a time (the lock is a
mutex for a few DDL statements, never a lease: leases are rows, see ``store``).

Tables (every per-session row goes with its session: ``ON DELETE CASCADE``):

- ``tenants`` and ``sessions``: the catalog, what any replica may query;
- ``session_logs``: one row per session, the *head* (seq of its last event), the *base*
  (seq of the snapshot recovery starts from) and the lease (``owner``, ``epoch``,
  ``expires_at``). Appends and lease changes all update this row, so the
  database serializes them per session;
- ``session_events``: one row per event, primary key ``(session_id, seq)``, an idempotency
  key unique per session, the event's frame (as the disk log writes it) and its CRC-32;
- ``session_snapshots`` and ``session_snapshot_chunks``: a snapshot's manifest (size,
  chunk count) and its safetensors bytes in chunks well below bytea's 1 GB, each with its
  CRC-32. A snapshot is written in one transaction: whole or absent;
- ``session_keys``: idempotency keys archived by compaction.

A ``shard`` column is left for later (tensor sharding across replicas): snapshots and
events of one session would then be keyed by shard too.
"""

from __future__ import annotations

from typing import LiteralString

import psycopg

MIGRATIONS: list[tuple[int, LiteralString]] = [
    (
        1,
        """
        CREATE TABLE tenants (
            id text PRIMARY KEY,
            created_at double precision NOT NULL
        );
        CREATE TABLE sessions (
            id text PRIMARY KEY,
            tenant text NOT NULL REFERENCES tenants (id),
            config text NOT NULL,
            labels text NOT NULL,
            created_at double precision NOT NULL
        );
        CREATE INDEX sessions_by_tenant ON sessions (tenant, id);
        CREATE INDEX sessions_by_creation ON sessions (created_at, id);
        CREATE TABLE session_logs (
            session_id text PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
            head bigint NOT NULL,
            base bigint NOT NULL,
            owner text,
            epoch bigint NOT NULL DEFAULT 0,
            expires_at timestamptz NOT NULL DEFAULT '-infinity'
        );
        CREATE TABLE session_events (
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq bigint NOT NULL,
            kind text NOT NULL,
            key text,
            frame bytea NOT NULL,
            checksum bigint NOT NULL,
            PRIMARY KEY (session_id, seq),
            UNIQUE (session_id, key)
        );
        CREATE TABLE session_snapshots (
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            seq bigint NOT NULL,
            size bigint NOT NULL,
            chunks integer NOT NULL,
            written_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (session_id, seq)
        );
        CREATE TABLE session_snapshot_chunks (
            session_id text NOT NULL,
            seq bigint NOT NULL,
            chunk integer NOT NULL,
            data bytea NOT NULL,
            checksum bigint NOT NULL,
            PRIMARY KEY (session_id, seq, chunk),
            FOREIGN KEY (session_id, seq) REFERENCES session_snapshots (session_id, seq)
                ON DELETE CASCADE
        );
        -- Tensor bytes do not compress: store them out of line without trying (pglz
        -- would spend about as long failing to compress a frame as writing it).
        ALTER TABLE session_events ALTER COLUMN frame SET STORAGE EXTERNAL;
        ALTER TABLE session_snapshot_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
        CREATE TABLE session_keys (
            session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            key text NOT NULL,
            fingerprint text NOT NULL,
            step bigint NOT NULL,
            seq bigint NOT NULL,
            PRIMARY KEY (session_id, key)
        );
        """,
    ),
]
"""(version, SQL) in order. Never edit an applied migration: add the next one."""

SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x6F70_7473_6572_7665  # "optserve": one advisory lock id for migrations


def migrate(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Apply the migrations this database lacks; return its schema version.

    Refuses a database migrated by a newer optserve (its tables may mean something else).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS optserve_schema ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM optserve_schema").fetchone()
        current = int(row[0]) if row else 0  # type: ignore[call-overload]
        if current > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database's schema is version {current}; this optserve knows up to "
                f"{SCHEMA_VERSION}: upgrade optserve"
            )
        for version, sql in MIGRATIONS:
            if version > current:
                conn.execute(sql)
                conn.execute("INSERT INTO optserve_schema (version) VALUES (%s)", (version,))
    return SCHEMA_VERSION

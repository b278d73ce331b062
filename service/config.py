"""Server settings: one ``BaseSettings``, read from ``OPTSERVE_*`` environment variables.

The CLI overrides a few of them (host, port, data dir, insecure) from its flags.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Everything configurable about a running server (env prefix ``OPTSERVE_``)."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", extra="ignore", frozen=True)

    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind (0: any free port)")
    data_dir: Path = Field(default=Path("optserve-data"), description="where durable sessions live")
    storage: Literal["disk", "memory", "postgres"] = Field(
        default="disk",
        description="'disk' (durable), 'postgres' (durable, shared by replicas) or 'memory' "
        "(tests and benchmarks)",
    )
    database_url: str = Field(
        default="",
        description="PostgreSQL URL for storage 'postgres' (postgresql://user:pass@host/db)",
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=1000, description="connections to PostgreSQL per process"
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="how long a replica's lease on a session lasts unrenewed (storage 'postgres')",
    )
    api_keys: str = Field(
        default="", description="bearer keys as 'tenantA:key1,tenantB:key2'; none configured = open"
    )
    api_keys_file: Path | None = Field(
        default=None, description="file of 'tenant:key' lines (# comments), merged with api_keys"
    )
    insecure: bool = Field(
        default=False, description="allow binding a non-loopback address without API keys"
    )
    max_body_bytes: int = Field(
        default=512 * MiB,
        ge=1024,
        description="largest request body, counted while streaming (413)",
    )
    max_body_bytes_in_flight: int = Field(
        default=1024 * MiB,
        ge=1024,
        description="request body bytes held at once across all requests; a request that "
        "would exceed it waits up to body_budget_wait_s, then gets 503 with Retry-After "
        "(at least max_body_bytes)",
    )
    body_budget_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="how long a request body waits for room in max_body_bytes_in_flight",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="longest wait for a request's headers, from connect or its first byte; "
        "the connection is then closed",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="longest wait for the next part of a request body (408, connection closed)",
    )
    keep_alive_timeout_s: int = Field(
        default=30, ge=1, description="idle seconds after which a keep-alive connection is closed"
    )
    max_idle_connections: int = Field(
        default=256,
        ge=1,
        description="idle keep-alive connections kept open; past it, the one idle longest "
        "is closed",
    )
    max_connections: int = Field(
        default=2048,
        ge=1,
        description="open connections (and requests in progress) past which a request gets 503",
    )
    max_tensors_per_session: int = Field(default=1024, ge=1, description="tensors per session")
    max_elements_per_session: int = Field(
        default=100_000_000,
        ge=1,
        description="parameter elements per session, over all its tensors, plus SOAP's "
        "preconditioner entries",
    )
    max_sessions_per_tenant: int = Field(default=1000, ge=1, description="live sessions per tenant")
    idempotency_window: int = Field(
        default=16, ge=1, description="step responses kept per session for idempotent replay"
    )
    idempotency_window_bytes: int = Field(
        default=1 * MiB,
        ge=0,
        description="tensor bytes kept per session in older step responses; the newest "
        "keyed response is always kept whole, older ones past this are answered 409",
    )
    step_history: int = Field(
        default=10_000,
        ge=1,
        description="records of each session's step history kept for GET .../steps (the "
        "newest; each costs about 200 bytes in the session's snapshots)",
    )
    snapshot_every: int = Field(
        default=100, ge=1, description="steps between full snapshots of a session (disk storage)"
    )
    memory_budget: int | None = Field(
        default=None,
        ge=1,
        description="bytes of session state to keep in memory; past it the least recently "
        "used sessions are evicted to their stored history and loaded again on their next "
        "request (unset: no limit)",
    )
    idle_evict_s: float | None = Field(
        default=1800.0,
        gt=0,
        description="seconds after which an unused session is evicted from memory (it is "
        "loaded again on its next request); unset to keep sessions loaded",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="log level of the JSON logs on stderr"
    )
    cors_origins: str = Field(
        default="",
        description="origins allowed to call from browsers, comma-separated ('*' for any); "
        "none by default",
    )
    access_log: bool = Field(default=True, description="log one JSON line per request")

    @model_validator(mode="after")
    def _budget_holds_one_body(self) -> Settings:
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                "max_body_bytes_in_flight must be at least max_body_bytes, "
                "or the largest allowed body could never be read"
            )
        return self

    @model_validator(mode="after")
    def _database_for_postgres(self) -> Settings:
        if self.storage == "postgres" and not self.database_url:
            raise ValueError("storage 'postgres' needs OPTSERVE_DATABASE_URL (or --database-url)")
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    def binds_loopback_only(self) -> bool:
        """Whether ``host`` is a loopback address (or ``localhost``)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

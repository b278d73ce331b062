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
    max_tensors_per_session: int = Field(default=1024, ge=1, description="tensors per session")
    max_elements_per_session: int = Field(
        default=100_000_000,
        ge=1,
        description="parameter elements per session, over all its tensors",
    )
    max_sessions_per_tenant: int = Field(default=1000, ge=1, description="live sessions per tenant")
    idempotency_window: int = Field(
        default=16, ge=1, description="step responses kept per session for idempotent replay"
    )
    snapshot_every: int = Field(
        default=100, ge=1, description="steps between full snapshots of a session (disk storage)"
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

"""Request dependencies as ``Annotated`` aliases: the service, the settings, the tenant.

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies on a thread
pool, which would cost a thread hop per dependency on every request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request

from service.api.auth import OPEN_TENANT, KeyTable
from service.api.metrics import Metrics
from service.api.problems import Unauthorized
from service.config import Settings
from service.sessions.service import SessionService


async def get_service(request: Request) -> SessionService:
    service: SessionService = request.app.state.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def authenticate(request: Request) -> str:
    """The tenant the bearer key belongs to; 401 without a valid key (unless open)."""
    keys: KeyTable = request.app.state.keys
    if keys.open:
        tenant = OPEN_TENANT
    else:
        header = request.headers.get("authorization")
        if header is None:
            raise Unauthorized(
                "this server needs an API key: Authorization: Bearer <key>", invalid_key=False
            )
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'", invalid_key=True)
        found = keys.tenant_for(key.strip())
        if found is None:
            raise Unauthorized("the API key is not valid", invalid_key=True)
        tenant = found
    request.scope["state"]["tenant"] = tenant
    return tenant


ServiceDep = Annotated[SessionService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
TenantDep = Annotated[str, Depends(authenticate)]

PageLimit = Annotated[int, Query(ge=1, le=1000)]
"""The most entries one page of a listing answers."""
AfterPosition = Annotated[int | None, Query(ge=0)]
"""The cursor of a listing by position (steps, changes): the entries after this one."""


@dataclass(frozen=True)
class Context:
    """Everything a hot route needs, resolved as one dependency (each one costs per request)."""

    tenant: str
    service: SessionService
    settings: Settings
    metrics: Metrics


async def context(request: Request) -> Context:
    state = request.app.state
    return Context(await authenticate(request), state.service, state.settings, state.metrics)


ContextDep = Annotated[Context, Depends(context)]

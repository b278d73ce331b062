"""The FastAPI application: settings, service, middleware, error mapping, routes."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.api import errors, schemas
from service.api.auth import KeyTable
from service.api.inflight import BodyBudget
from service.api.metrics import Metrics
from service.api.middleware import RequestContext
from service.api.routes import (
    catalog,
    docs_ui,
    federated,
    groups,
    health,
    history,
    sessions,
    steps,
    ui,
)
from service.config import Settings
from service.sessions.models import Limits
from service.sessions.runtime import Runtime
from service.sessions.service import SessionService
from service.sessions.store.base import Store
from service.sessions.store.disk import DiskStore
from service.sessions.store.memory import MemoryStore

CORS_REQUEST_HEADERS = (
    "Authorization",
    "Content-Type",
    "Accept",
    "Idempotency-Key",
    "If-Match",
    "X-Request-ID",
)
CORS_RESPONSE_HEADERS = (
    "ETag",
    "Location",
    "X-Request-ID",
    "Idempotent-Replayed",
    "Retry-After",
    "WWW-Authenticate",
)


def _version() -> str:
    try:
        return metadata.version("optserve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def build_service(settings: Settings) -> SessionService:
    """The session service the settings describe (on disk, in PostgreSQL, or in memory)."""
    store: Store
    if settings.storage == "memory":
        # A memory server never restarts into its sessions: its store keeps no history.
        store = MemoryStore(keep_history=False)
    elif settings.storage == "postgres":
        # Imported here: psycopg is the optional 'postgres' extra.
        from service.sessions.store.postgres import PostgresStore

        store = PostgresStore(
            settings.database_url,
            pool_size=settings.database_pool_size,
            lease_ttl=settings.lease_seconds,
        )
    else:
        store = DiskStore(settings.data_dir)
    limits = Limits(
        max_tensors_per_session=settings.max_tensors_per_session,
        max_elements_per_session=settings.max_elements_per_session,
        max_sessions_per_tenant=settings.max_sessions_per_tenant,
    )
    runtime = Runtime(
        store,
        idempotency_window=settings.idempotency_window,
        idempotency_window_bytes=settings.idempotency_window_bytes,
        snapshot_every=settings.snapshot_every,
        memory_budget=settings.memory_budget,
        idle_evict_s=settings.idle_evict_s,
        lease_ttl=settings.lease_seconds,
        step_history=settings.step_history,
    )
    return SessionService(runtime, limits)


def create_app(settings: Settings | None = None, service: SessionService | None = None) -> FastAPI:
    """Build the app. The service starts (recovering stored sessions) with the app's lifespan;
    without one given, each lifespan builds its own from the settings, so an app can be
    started again after a shutdown."""
    settings = settings or Settings()
    keys = KeyTable.from_settings(settings.api_keys, settings.api_keys_file)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = service if service is not None else build_service(settings)
        app.state.service = running
        await running.start()
        metrics.track_sessions(
            lambda: sum(running.runtime.per_tenant.values()), lambda: len(running.runtime.loaded())
        )
        # What exists now (modules, routes, recovered sessions) lives as long as the
        # process: keep it out of the garbage collector's full passes.
        gc.freeze()
        try:
            yield
        finally:
            await running.close()

    # Routes go straight into the app's router (the step route first, as the hot one):
    # included routers would be matched level by level on every request.
    routes = [
        route
        for module in (steps, sessions, groups, history, federated, catalog, health, docs_ui, ui)
        for route in module.router.routes
    ]
    app = FastAPI(
        routes=routes,
        title="optserve",
        version=_version(),
        summary="torch.optim optimizers and schedules as a stateful REST service",
        lifespan=lifespan,
        redoc_url=None,
        docs_url=None,  # routes/docs_ui.py serves /docs from installed files
        # /metrics is optserve's own; no OpenTelemetry work on the hot path.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.body_budget = BodyBudget(
        settings.max_body_bytes_in_flight, settings.body_budget_wait_s
    )
    errors.install(app)
    app.add_middleware(
        RequestContext,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        access_log=settings.access_log,
        budget=app.state.body_budget,
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        # Added last, so outermost: browsers' preflight requests are answered before auth.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=list(CORS_REQUEST_HEADERS),
            expose_headers=list(CORS_RESPONSE_HEADERS),
            max_age=600,
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            document = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                schemas.COMPONENTS
            )
            document["components"]["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            for path, operations in document["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

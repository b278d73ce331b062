"""Liveness, readiness and Prometheus metrics (no auth: probes and scrapers carry no key)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.api import schemas
from service.api.deps import MetricsDep, ServiceDep
from service.api.errors import problem_response
from service.api.metrics import CONTENT_TYPE
from service.api.responses import json_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive", responses=schemas.health_responses())
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="The store is reachable", responses=schemas.ready_responses())
async def readyz(service: ServiceDep) -> Response:
    if await service.ready():
        return json_response({"status": "ready"})
    return problem_response(503, "not-ready", "Not ready", "the session store is not reachable")


@router.get("/metrics", summary="Prometheus metrics", responses=schemas.metrics_responses())
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE)

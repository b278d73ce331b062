"""What the server supports: optimizers, schedules, and a preview of a schedule's lr."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.api import schemas
from service.api.body import json_object
from service.api.deps import ServiceDep, TenantDep
from service.api.media import require_json_answer
from service.api.problems import InvalidRequest
from service.api.responses import json_response
from service.api.wire import finite_number

router = APIRouter(tags=["catalog"])

MAX_PREVIEW_STEPS = 100_000
PREVIEW_KEYS = frozenset({"optimizer", "schedule", "steps", "param_groups", "metrics"})


@router.get(
    "/v1/optimizers",
    summary="Every optimizer, its arguments, types and defaults",
    responses=schemas.catalog_responses(),
)
async def optimizers(request: Request, tenant: TenantDep, service: ServiceDep) -> Response:
    require_json_answer(request)
    return json_response({"optimizers": service.catalog_optimizers()})


@router.get(
    "/v1/schedules",
    summary="Every schedule, its arguments, types and defaults",
    responses=schemas.catalog_responses(),
)
async def schedules(request: Request, tenant: TenantDep, service: ServiceDep) -> Response:
    require_json_answer(request)
    return json_response({"schedules": service.catalog_schedules()})


def _preview_args(
    document: dict[str, Any],
) -> tuple[dict[str, Any], Any, int, Any, list[float] | None]:
    problems: list[tuple[str, str]] = []
    problems += [(name, "unknown field") for name in sorted(set(document) - PREVIEW_KEYS)]
    optimizer = document.get("optimizer")
    if not isinstance(optimizer, dict):
        problems.append(("optimizer", "required: an object with the optimizer's name and lr"))
    steps = document.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_PREVIEW_STEPS:
        problems.append(("steps", f"required: an integer from 1 to {MAX_PREVIEW_STEPS}"))
    groups = document.get("param_groups")
    if groups is not None and not isinstance(groups, list):
        problems.append(("param_groups", "must be a list of groups"))
    metrics = document.get("metrics")
    if metrics is not None and not (
        isinstance(metrics, list) and all(finite_number(m) for m in metrics)
    ):
        problems.append(("metrics", "must be a list of finite numbers, one per step"))
    if problems:
        raise InvalidRequest("; ".join(f"{f}: {m}" for f, m in problems), problems)
    assert isinstance(optimizer, dict) and isinstance(steps, int)
    floats = None if metrics is None else [float(m) for m in metrics]
    return optimizer, document.get("schedule"), steps, groups, floats


@router.post(
    "/v1/schedules/preview",
    summary="The lr of every group at every step, from a fresh start",
    responses=schemas.preview_responses(),
    openapi_extra=schemas.preview_request(),
)
async def preview(request: Request, tenant: TenantDep, service: ServiceDep) -> Response:
    require_json_answer(request)
    optimizer, schedule, steps, groups, metrics = _preview_args(await json_object(request))
    # Up to 100k schedule steps of Python: keep them off the event loop.
    document = await run_in_threadpool(
        service.preview_document, optimizer, schedule, steps, groups, metrics
    )
    return json_response(document)

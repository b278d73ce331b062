"""``GET /v1/sessions/{id}/steps``: the step history, a page at a time."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api import schemas
from service.api.deps import AfterPosition, PageLimit, ServiceDep, TenantDep
from service.api.media import require_json_answer
from service.api.responses import json_response

router = APIRouter(tags=["steps"])


@router.get(
    "/v1/sessions/{session_id}/steps",
    summary="The step history: step, time, lr per group, metrics, applied or skipped",
    responses=schemas.history_responses(),
)
async def list_steps(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    limit: PageLimit = 100,
    after: AfterPosition = None,
) -> Response:
    require_json_answer(request)
    records, cursor = await service.history(tenant, session_id, after, limit)
    return json_response({"steps": [r.document() for r in records], "next": cursor})

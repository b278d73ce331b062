"""Session resources: create or restore, list, read, delete, params, state, schedule step."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.api import offload, schemas
from service.api.body import json_object, tensor_body
from service.api.deps import MetricsDep, PageLimit, ServiceDep, SettingsDep, TenantDep
from service.api.media import Wire, require_json_answer, response_wire
from service.api.problems import InvalidRequest
from service.api.responses import (
    json_response,
    raw_json_response,
    safetensors_response,
    session_response,
)
from service.api.wire import (
    parse_json_object,
    reject_unknown_fields,
    session_config_from_json,
    tensors_json_document,
)
from service.codec import safetensors
from service.sessions.models import SessionInfo

router = APIRouter(tags=["sessions"])

SESSION = "/v1/sessions/{session_id}"
# A checkpoint holds a few state arrays per tensor besides the tensors themselves.
_CHECKPOINT_ARRAYS_PER_TENSOR = 8


def _metric(document: dict[str, Any]) -> float | None:
    reject_unknown_fields(document, {"metric"})
    value = document.get("metric")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("metric must be a number", [("metric", "must be a number")])
    try:
        return float(value)
    except OverflowError:
        raise InvalidRequest(
            "metric is too large for a float", [("metric", "too large for a float")]
        ) from None


@router.post(
    "/v1/sessions",
    status_code=201,
    summary="Create a session, or restore one from a checkpoint",
    responses=schemas.create_responses(),
    openapi_extra=schemas.create_request(),
)
async def create_session(
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    wire, body = await tensor_body(request)
    info: SessionInfo
    if wire is Wire.JSON:
        document = await offload.by_size(len(body), parse_json_object, body)
        config, initial = await offload.by_size(len(body), session_config_from_json, document)
        info = await service.create(tenant, config, initial)
    else:
        limit = settings.max_tensors_per_session * _CHECKPOINT_ARRAYS_PER_TENSOR + 16
        tensors, metadata = safetensors.decode(body, max_tensors=limit)  # zero-copy: fast
        if service.is_checkpoint(metadata):
            info = await service.restore(tenant, tensors, metadata)
        elif "session" in metadata:
            config = parse_json_object(metadata["session"].encode(), '__metadata__["session"]')
            info = await service.create(tenant, config, tensors)
        else:
            raise InvalidRequest(
                'a safetensors body must carry its config as __metadata__["session"] '
                "or be a checkpoint from GET /v1/sessions/{id}/state",
                [("__metadata__.session", "required")],
            )
    metrics.sessions_created.inc()
    return session_response(info, 201, location=True)


@router.get(
    "/v1/sessions",
    summary="List this tenant's sessions",
    responses=schemas.list_responses(),
)
async def list_sessions(
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    limit: PageLimit = 100,
    after: Annotated[str | None, Query(max_length=256)] = None,
) -> Response:
    require_json_answer(request)
    infos, cursor = await service.list(tenant, limit, after)
    return json_response({"sessions": [i.document() for i in infos], "next": cursor})


@router.get(SESSION, summary="Read a session", responses=schemas.session_responses())
async def get_session(
    session_id: str, request: Request, tenant: TenantDep, service: ServiceDep
) -> Response:
    require_json_answer(request)
    return session_response(await service.get(tenant, session_id))


@router.delete(
    SESSION, status_code=204, summary="Delete a session", responses=schemas.delete_responses()
)
async def delete_session(
    session_id: str, tenant: TenantDep, service: ServiceDep, metrics: MetricsDep
) -> Response:
    await service.delete(tenant, session_id)
    metrics.sessions_deleted.inc()
    return Response(status_code=204)


async def _params_at_one_step(
    service: ServiceDep,
    tenant: str,
    session_id: str,
    evaluation: bool = False,
    average: bool = False,
) -> tuple[SessionInfo, dict[str, np.ndarray]]:
    """The params with the step they belong to: re-read if a step landed in between."""
    info = await service.get(tenant, session_id)
    for _ in range(3):
        tensors = await service.params(tenant, session_id, evaluation, average=average)
        after = await service.get(tenant, session_id)
        if after.step == info.step:
            break
        info = after
    return info, tensors


async def _safetensors_answer(
    tensors: dict[str, np.ndarray], metadata: dict[str, str], headers: dict[str, str]
) -> Response:
    """A safetensors response, encoded off the event loop when it is large."""
    size = offload.tensor_bytes(tensors)
    body = await offload.by_size(size, safetensors.encode, tensors, metadata)
    return safetensors_response(body, headers)


@router.get(
    SESSION + "/params",
    summary="The parameters a session holds",
    responses=schemas.params_responses(),
)
async def get_params(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    evaluation: Annotated[
        bool,
        Query(
            alias="eval",
            description="the point to evaluate the model at: schedule-free optimizers' "
            "average x (what their eval() puts in the parameters); the parameters elsewhere",
        ),
    ] = False,
    average: Annotated[bool, Query(description="the averaged weights (averaging)")] = False,
) -> Response:
    answer = response_wire(request, Wire.JSON)
    info, tensors = await _params_at_one_step(service, tenant, session_id, evaluation, average)
    headers = {"ETag": info.etag}
    if answer is Wire.JSON:
        size = offload.tensor_bytes(tensors)
        text = await offload.by_size(size, tensors_json_document, info.step, tensors)
        return raw_json_response(text, headers)
    return await _safetensors_answer(tensors, {"step": str(info.step)}, headers)


@router.get(
    SESSION + "/state",
    summary="A checkpoint that POST /v1/sessions restores",
    responses=schemas.state_responses(),
)
async def export_state(
    session_id: str, request: Request, tenant: TenantDep, service: ServiceDep
) -> Response:
    response_wire(request, Wire.SAFETENSORS, (Wire.SAFETENSORS,))
    arrays, metadata = await service.export_state(tenant, session_id)
    headers = {}
    if "step" in metadata:
        headers["ETag"] = f'"{metadata["step"]}"'
    return await _safetensors_answer(arrays, metadata, headers)


@router.post(
    SESSION + "/schedule/step",
    summary="Advance a manual schedule once",
    responses=schemas.session_responses(),
    openapi_extra=schemas.schedule_step_request(),
)
async def schedule_step(
    session_id: str, request: Request, tenant: TenantDep, service: ServiceDep
) -> Response:
    require_json_answer(request)
    metric = _metric(await json_object(request, optional=True))
    return session_response(await service.schedule_step(tenant, session_id, metric))

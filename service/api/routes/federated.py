"""Federated sessions: the round, long polls for params, client updates, the history."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from service.api import federated_schemas as docs
from service.api.body import tensor_body
from service.api.deps import ServiceDep, SettingsDep, TenantDep
from service.api.federated_wire import (
    round_params_json,
    round_params_safetensors,
    update_from_json,
    update_from_safetensors,
)
from service.api.media import Wire, require_json_answer, response_wire
from service.api.responses import json_response, raw_json_response, safetensors_response
from service.api.routes.steps import parse_idempotency_key
from service.sessions.federated.coordinator import MAX_PAGE, MAX_WAIT_S

router = APIRouter(tags=["federated"])

SESSION = "/v1/sessions/{session_id}"


@router.get(
    SESSION + "/round",
    summary="Where aggregation stands: the open round (or the version, in async mode)",
    responses=docs.round_responses(),
)
async def get_round(
    session_id: str, request: Request, tenant: TenantDep, service: ServiceDep
) -> Response:
    require_json_answer(request)
    return json_response(await service.federated.round(tenant, session_id))


@router.get(
    SESSION + "/round/params",
    summary="The params to train from; with after and wait, a long poll for the next round",
    responses=docs.round_params_responses(),
)
async def get_round_params(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    after: Annotated[
        int | None,
        Query(ge=0, description="answer once the round (async: version) is past this one"),
    ] = None,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for it; 204 after")
    ] = 0.0,
) -> Response:
    answer = response_wire(request, Wire.JSON)
    params = await service.federated.params(tenant, session_id, after, wait)
    if params is None:
        return Response(status_code=204, headers={"Retry-After": "0"})
    headers = {"ETag": f'"{params.version}"'}
    if answer is Wire.JSON:
        return raw_json_response(round_params_json(params), headers)
    return safetensors_response(round_params_safetensors(params), headers)


@router.post(
    SESSION + "/updates",
    summary="Submit a client's update: its new params or its delta",
    responses=docs.update_responses(),
    openapi_extra=docs.update_request(),
)
async def post_update(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    settings: SettingsDep,
) -> Response:
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    wire, body = await tensor_body(request)
    if wire is Wire.JSON:
        update = update_from_json(body)
    else:
        update = update_from_safetensors(body, settings.max_tensors_per_session)
    if key is not None:
        update = dataclasses.replace(update, idempotency_key=key)
    reply = await service.federated.submit(tenant, session_id, update)
    headers = {"ETag": f'"{reply.version}"'}
    if reply.duplicate:
        headers["Idempotent-Replayed"] = "true"
    return json_response(reply.document(), headers=headers)


@router.get(
    SESSION + "/rounds",
    summary="Closed rounds (async: applied updates) with participation and update norms",
    responses=docs.history_responses(),
)
async def get_rounds(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    after: Annotated[
        int | None, Query(ge=0, description="rounds (async: versions) after this one")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> Response:
    require_json_answer(request)
    mode, records, cursor = await service.federated.history(tenant, session_id, after, limit)
    return json_response({"mode": mode, "rounds": records, "next": cursor})

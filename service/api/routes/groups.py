"""Param groups of a running session: edit one, add one, read the change log (DESIGN 4a)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from service.api import schemas
from service.api.body import json_object
from service.api.deps import AfterPosition, PageLimit, ServiceDep, TenantDep
from service.api.media import require_json_answer
from service.api.problems import InvalidRequest
from service.api.responses import json_response, session_response
from service.api.routes.steps import parse_if_match
from service.api.wire import session_config_from_json
from service.sessions.groups import AddGroupRequest, GroupEditRequest

router = APIRouter(tags=["param groups"])

GROUPS = "/v1/sessions/{session_id}/param_groups"
MAX_REASON = 1_000


def _reason(document: dict[str, Any]) -> str | None:
    reason = document.pop("reason", None)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InvalidRequest(
            f"reason must be a string of at most {MAX_REASON} characters",
            [("reason", "must be a short string")],
        )
    return reason


@router.patch(
    GROUPS + "/{index}",
    summary="Edit a param group's hyperparameters from the next step on",
    responses=schemas.session_responses(),
    openapi_extra=schemas.group_edit_request(),
)
async def edit_group(
    session_id: str,
    index: int,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    require_json_answer(request)
    document = await json_object(request)
    reason = _reason(document)
    edit = GroupEditRequest(index, document, reason, parse_if_match(if_match))
    return session_response(await service.edit_group(tenant, session_id, edit))


@router.post(
    GROUPS,
    summary="Add tensors in a new param group (torch's add_param_group)",
    responses=schemas.session_responses(),
    openapi_extra=schemas.group_add_request(),
)
async def add_group(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    require_json_answer(request)
    document = await json_object(request)
    reason = _reason(document)
    info = await service.get(tenant, session_id)
    tensors = document.pop("params", None)
    if not isinstance(tensors, dict):
        raise InvalidRequest(
            "params must be an object of the added tensors: name -> {shape, data?}",
            [("params", "required object")],
        )
    # Values are read in the session's dtype, so float64 data keeps every bit.
    specs, data = session_config_from_json({"params": tensors, "dtype": info.resolved["dtype"]})
    add = AddGroupRequest(specs["params"], data, document, reason, parse_if_match(if_match))
    return session_response(await service.add_group(tenant, session_id, add))


@router.get(
    "/v1/sessions/{session_id}/changes",
    summary="The change log: group edits and added groups",
    responses=schemas.changes_responses(),
)
async def list_changes(
    session_id: str,
    request: Request,
    tenant: TenantDep,
    service: ServiceDep,
    limit: PageLimit = 100,
    after: AfterPosition = None,
) -> Response:
    require_json_answer(request)
    changes, cursor = await service.changes(tenant, session_id, after, limit)
    return json_response({"changes": [c.document() for c in changes], "next": cursor})

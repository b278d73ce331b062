"""``POST /v1/sessions/{id}/step``: gradients in, deltas (or params) out."""

from __future__ import annotations

import functools
import re

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api import offload, schemas
from service.api.body import read_body, receive_body
from service.api.deps import context
from service.api.media import Wire, request_wire, response_wire
from service.api.problems import BadRequest, InvalidRequest
from service.api.responses import raw_json_response, safetensors_parts_response
from service.api.routing import RequestRoute
from service.api.step_limit import StepBodyBounds
from service.api.wire import (
    StepBody,
    fingerprinter,
    sha256_fingerprint,
    step_from_json,
    step_from_safetensors,
    step_reply_json,
    step_reply_safetensors,
)
from service.codec import safetensors
from service.sessions.errors import InvalidInput
from service.sessions.models import StepRequest
from service.sessions.service import SessionService

router = APIRouter(tags=["steps"], route_class=RequestRoute)

_ETAG = re.compile(r'\s*(?:W/)?"(\d{1,18})"\s*')
_KEY = re.compile(r"[\x21-\x7e]{1,255}")
RETURN_MODES = ("delta", "params", "none")
_BOUNDS = StepBodyBounds()
_BOUND_REASON = ", the most a step of this session can need (its tensors and a header)"


def parse_if_match(value: str | None) -> int | None:
    """``If-Match: "<step>"`` -> the step; ``*`` or absent -> None."""
    if value is None or value.strip() == "*":
        return None
    match = _ETAG.fullmatch(value)
    if match is None:
        raise BadRequest('If-Match must be one entity tag like "12" (or *)', "If-Match")
    return int(match.group(1))


def parse_return(value: str | None) -> str:
    if value is None:
        return "delta"
    if value not in RETURN_MODES:
        raise InvalidRequest(
            f"return must be one of {', '.join(RETURN_MODES)}, got {value!r}",
            [("return", f"must be one of {', '.join(RETURN_MODES)}")],
        )
    return value


def parse_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if _KEY.fullmatch(value) is None:
        raise BadRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters", "Idempotency-Key"
        )
    return value


async def _bare_name(service: SessionService, tenant: str, session_id: str) -> str:
    info = await service.get(tenant, session_id)
    names = list(info.resolved["params"])
    if len(names) != 1:
        raise InvalidInput(
            f"'grads' as a bare list is for one-tensor sessions; this one has {len(names)}: "
            "send an object of tensor name to values",
            "grads",
        )
    return str(names[0])


@router.post(
    "/v1/sessions/{session_id}/step",
    summary="Apply one optimizer step",
    responses=schemas.step_responses(),
    openapi_extra=schemas.step_request(),
)
async def step(request: Request) -> Response:
    # Path, query and headers are read by hand (and documented in the schema): FastAPI's
    # per-parameter resolution would cost more than the optimizer step at small sizes.
    session_id: str = request.path_params["session_id"]
    ctx = await context(request)
    wire = request_wire(request)
    answer = response_wire(request, wire)
    returns = parse_return(request.query_params.get("return"))
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    expected = parse_if_match(request.headers.get("if-match"))
    info = await ctx.service.get(ctx.tenant, session_id)
    bound = _BOUNDS.bound(info.resolved["params"], wire)
    # Past max_body_bytes the middleware refuses, under that limit's name.
    limit = bound if bound < ctx.settings.max_body_bytes else None
    body: bytes | memoryview
    parsed: StepBody
    # The fingerprint is taken chunk by chunk as the body arrives.
    digest = None if key is None else fingerprinter(wire, returns)
    observe = None if digest is None else digest.update
    if wire is Wire.JSON:
        body = await read_body(request, limit, _BOUND_REASON, observe)
        parsed = await offload.by_size(len(body), step_from_json, body)
    else:
        # Straight into one buffer; the decoded gradients are views of it (no copy).
        body = await receive_body(request, limit, _BOUND_REASON, safetensors.data_start, observe)
        # Decoding reads the header and makes views (a BF16 body is widened at memory
        # speed): a thread hop would cost more than it saves.
        parsed = step_from_safetensors(body, 2 * ctx.settings.max_tensors_per_session)
    grads = parsed.grads
    if parsed.bare is not None:
        grads = {await _bare_name(ctx.service, ctx.tenant, session_id): parsed.bare}
    reply = await ctx.service.step(
        ctx.tenant,
        session_id,
        StepRequest(
            grads=grads,
            params=parsed.params,
            loss=parsed.loss,
            idempotency_key=key,
            fingerprint="" if digest is None else digest.hexdigest(),
            sha256_fingerprint=(
                None if key is None else functools.partial(sha256_fingerprint, body, wire, returns)
            ),
            if_match=expected,
            want=returns,
        ),
    )
    ctx.metrics.step_outcome(reply.applied, reply.replayed)
    headers = {"ETag": f'"{reply.step}"'}
    if reply.replayed:
        headers["Idempotent-Replayed"] = "true"
    size = offload.tensor_bytes(reply.tensors)
    if answer is Wire.JSON:
        text = await offload.by_size(size, step_reply_json, reply, returns)
        return raw_json_response(text, headers)
    # The header and views of the deltas, sent as they are: nothing joined or copied.
    return safetensors_parts_response(step_reply_safetensors(reply), headers)

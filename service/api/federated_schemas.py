"""The OpenAPI description of the federated routes' bodies (written inline, not as components)."""

from __future__ import annotations

from typing import Any

from service.api.media import JSON_TYPE, SAFETENSORS_TYPE

PROBLEM_JSON = "application/problem+json"

_PROBLEM = {"$ref": "#/components/schemas/Problem"}
_TENSOR_MAP = {"$ref": "#/components/schemas/TensorMap"}
_BINARY = {"type": "string", "format": "binary"}
_INT = {"type": "integer", "minimum": 0}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NUMBER = {"type": "number"}
_OBJECT = {"type": "object", "additionalProperties": True}

_DESCRIBED = {
    400: "Unreadable request (malformed body or header)",
    401: "Missing or invalid API key",
    404: "No such session for this tenant",
    406: "No acceptable response type",
    408: "The body stopped arriving (body_timeout_s); the connection is closed",
    409: "Conflict: not a federated session, a round not open yet, another update by the "
    "same client for the same round",
    410: "Gone: the round has closed, or the update is too stale",
    413: "Body larger than the configured limit",
    415: "Unsupported Content-Type",
    422: "Invalid request (fields named in errors)",
    503: "Store unavailable, or too many request bodies in flight (Retry-After)",
}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    content = {PROBLEM_JSON: {"schema": _PROBLEM}}
    return {s: {"description": _DESCRIBED[s], "content": content} for s in statuses}


ROUND = {
    "type": "object",
    "required": ["mode", "aggregation", "version"],
    "properties": {
        "mode": {"enum": ["rounds", "async"]},
        "aggregation": _OBJECT,
        "version": {"type": "integer", "description": "the session's step"},
        "client_lr": {"type": ["number", "null"], "description": "eta_l of Flower presets"},
        "lr": {"type": "array", "items": {"$ref": "#/components/schemas/Float"}},
        "round": {"type": "integer"},
        "status": {"enum": ["open", "overdue"]},
        "opened_at": {"type": "string"},
        "deadline": {"type": ["string", "null"]},
        "seconds_left": {"type": ["number", "null"]},
        "received": {"type": "integer"},
        "clients": {"type": "array", "items": {"type": "string"}},
        "needed": {"type": "integer"},
        "proximal_mu": {
            **_NUMBER,
            "description": "FedProx: add mu/2 * ||w - w_round||^2 to the local loss",
        },
        "clipping_norm": {
            "type": ["number", "null"],
            "description": "with privacy: the norm this round's updates are clipped to",
        },
        "oldest_base_version": {"type": "integer"},
        "applied_updates": {"type": "integer"},
    },
    "additionalProperties": True,
}
ROUND_PARAMS = {
    "type": "object",
    "required": ["mode", "round", "version", "params"],
    "properties": {
        "mode": {"enum": ["rounds", "async"]},
        "round": _NULLABLE_INT,
        "version": {"type": "integer"},
        "params": _TENSOR_MAP,
    },
}
UPDATE = {
    "type": "object",
    "required": ["client_id"],
    "properties": {
        "client_id": {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$"},
        "round": {**_INT, "description": "rounds mode: the round trained in"},
        "base_version": {**_INT, "description": "async mode: the version trained from"},
        "num_examples": {**_INT, "description": "the weight with weighting=num_examples"},
        "params": {**_TENSOR_MAP, "description": "the client's new values"},
        "delta": {**_TENSOR_MAP, "description": "new values minus those trained from"},
    },
    "additionalProperties": False,
}
UPDATE_REPLY = {
    "type": "object",
    "required": ["mode", "client_id", "accepted", "duplicate", "version"],
    "properties": {
        "mode": {"enum": ["rounds", "async"]},
        "client_id": {"type": "string"},
        "accepted": {"type": "boolean"},
        "duplicate": {"type": "boolean"},
        "version": {"type": "integer"},
        "round": {"type": "integer"},
        "received": {"type": "integer"},
        "round_closed": {"type": "boolean"},
        "base_version": {"type": "integer"},
        "staleness": {"type": "integer"},
        "weight": _NUMBER,
    },
}
HISTORY = {
    "type": "object",
    "required": ["mode", "rounds", "next"],
    "properties": {
        "mode": {"enum": ["rounds", "async"]},
        "rounds": {"type": "array", "items": _OBJECT},
        "next": {"type": ["integer", "null"], "description": "cursor for ?after="},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON_TYPE: {"schema": schema}}


def round_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "The round", "content": _json(ROUND)},
        **_problems(401, 404, 406, 409, 422),
    }


def round_params_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "The params of the open round",
            "content": {**_json(ROUND_PARAMS), SAFETENSORS_TYPE: {"schema": _BINARY}},
        },
        204: {"description": "Nothing newer than 'after' within 'wait' seconds"},
        **_problems(401, 404, 406, 409, 422),
    }


def update_request() -> dict[str, Any]:
    return {
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "a retry with the same key and body gets the same answer; "
                "the key with another update is refused (422)",
                "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                **_json(UPDATE),
                SAFETENSORS_TYPE: {
                    "schema": _BINARY,
                    "description": "params/<name> or delta/<name> tensors; client_id, round "
                    "or base_version, num_examples in __metadata__",
                },
            },
        },
    }


def update_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "Accepted (or accepted before)", "content": _json(UPDATE_REPLY)},
        **_problems(400, 401, 404, 406, 408, 409, 410, 413, 415, 422, 503),
    }


def history_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "One page", "content": _json(HISTORY)},
        **_problems(401, 404, 406, 409, 422),
    }

"""The OpenAPI description of bodies the routes read and write by hand.

Tensor payloads bypass pydantic for speed, so their shapes are written down here as JSON
Schema; ``COMPONENTS`` is merged into the document's ``components.schemas``.
"""

from __future__ import annotations

from typing import Any

from service.api.media import JSON_TYPE, SAFETENSORS_TYPE

PROBLEM_JSON = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_NUMBER = {"type": "number"}
_FLOAT = {"$ref": "#/components/schemas/Float"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_OBJECT = {"type": "object", "additionalProperties": True}
_BINARY = {"type": "string", "format": "binary"}

COMPONENTS: dict[str, Any] = {
    "Float": {
        "description": (
            'a number; a non-finite one is the string "inf", "-inf" or "nan" (JSON has no '
            'token for it). Requests may also write "Infinity" (any case) or the NaN and '
            "Infinity tokens"
        ),
        "anyOf": [
            _NUMBER,
            {
                "type": "string",
                "pattern": "^[+-]?([Ii][Nn][Ff]([Ii][Nn][Ii][Tt][Yy])?|[Nn][Aa][Nn])$",
            },
        ],
    },
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem document",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "request_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {
                        "field": {"type": ["string", "null"]},
                        "message": {"type": "string"},
                    },
                },
            },
        },
        "additionalProperties": True,
    },
    "TensorValues": {
        "description": (
            "numbers nested to the tensor's shape, or flat in row-major order; in replies a "
            'non-finite element (an update that overflowed) is "inf", "-inf" or "nan"'
        ),
        "anyOf": [_FLOAT, {"type": "array", "items": _ref("TensorValues")}],
    },
    "TensorMap": {
        "type": "object",
        "additionalProperties": _ref("TensorValues"),
        "description": "tensor name -> values",
    },
    "NamedConfig": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}},
        "additionalProperties": True,
        "description": "torch's class name plus its constructor arguments",
    },
    "TensorSpec": {
        "type": "object",
        "required": ["shape"],
        "properties": {
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "data": _ref("TensorValues"),
        },
    },
    "SessionCreate": {
        "type": "object",
        "required": ["optimizer", "params"],
        "properties": {
            "optimizer": _ref("NamedConfig"),
            "schedule": {"anyOf": [_ref("NamedConfig"), {"type": "null"}]},
            "params": {"type": "object", "additionalProperties": _ref("TensorSpec")},
            "param_groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["params"],
                    "properties": {"params": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": True,
                },
            },
            "dtype": {"enum": ["float32", "float64"]},
            "clip_grad_norm": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["max_norm"],
                        "properties": {"max_norm": _FLOAT, "norm_type": _FLOAT},
                    },
                    {"type": "null"},
                ]
            },
            "clip_grad_value": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["clip_value"],
                        "properties": {"clip_value": _FLOAT},
                    },
                    {"type": "null"},
                ]
            },
            "nonfinite": {"enum": ["error", "skip"]},
            "missing_grads": {
                "enum": ["error", "skip"],
                "description": "skip: a step may leave tensors out, as torch skips a "
                "parameter whose grad is None",
            },
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "aggregation": {
                "description": "federated: aggregate client updates (docs/federated.md)",
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["mode"],
                        "properties": {"mode": {"enum": ["rounds", "async"]}},
                        "additionalProperties": True,
                    },
                    {"type": "null"},
                ],
            },
        },
    },
    "Session": {
        "type": "object",
        "required": ["id", "step", "lr", "optimizer", "tensors", "holds_params", "dtype"],
        "properties": {
            "id": {"type": "string"},
            "step": {"type": "integer"},
            "lr": {"type": "array", "items": _FLOAT},
            "optimizer": _OBJECT,
            "schedule": {"type": ["object", "null"]},
            "param_groups": {"type": "array", "items": _OBJECT},
            "tensors": {"type": "object", "additionalProperties": _OBJECT},
            "holds_params": {"type": "boolean"},
            "dtype": {"type": "string"},
            "nonfinite": {"type": "string"},
            "missing_grads": {"type": "string"},
            "skipped_steps": {"type": "integer"},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "health": {
                "enum": ["ok", "damaged"],
                "description": "damaged: the stored history does not read back; steps and "
                "reads answer 503 session-damaged until an operator repairs it",
            },
            "damage": {"type": ["string", "null"], "description": "why it is damaged"},
        },
        "additionalProperties": True,
    },
    "SessionList": {
        "type": "object",
        "required": ["sessions", "next"],
        "properties": {
            "sessions": {"type": "array", "items": _ref("Session")},
            "next": {"type": ["string", "null"], "description": "cursor for ?after="},
        },
    },
    "StepRequest": {
        "type": "object",
        "required": ["grads"],
        "properties": {
            "grads": {
                "anyOf": [_ref("TensorMap"), {"type": "array", "items": _ref("TensorValues")}],
                "description": "tensor name -> gradient; a bare list for a one-tensor session",
            },
            "params": _ref("TensorMap"),
            "loss": _NULLABLE_NUMBER,
        },
        "additionalProperties": False,
    },
    "StepReply": {
        "type": "object",
        "required": ["step", "lr", "applied"],
        "properties": {
            "step": {"type": "integer"},
            "lr": {"type": "array", "items": _FLOAT},
            "applied": {"type": "boolean"},
            "evaluate": {"type": "boolean"},
            "skipped": {"type": "string"},
            "metrics": _ref("StepMetrics"),
            "accumulated": {
                "type": "integer",
                "description": "with accumulate: micro-batches in the running sum now",
            },
            "of": {"type": "integer", "description": "with accumulate: micro-batches per step"},
            "deltas": _ref("TensorMap"),
            "params": _ref("TensorMap"),
        },
    },
    "Params": {
        "type": "object",
        "required": ["step", "params"],
        "properties": {"step": {"type": "integer"}, "params": _ref("TensorMap")},
    },
    "GroupEdit": {
        "type": "object",
        "description": "hyperparameters of the group's optimizer to set, and an optional "
        "reason recorded in the change log",
        "properties": {"reason": {"type": ["string", "null"]}},
        "additionalProperties": True,
    },
    "GroupAdd": {
        "type": "object",
        "required": ["params"],
        "description": "torch's add_param_group: the new tensors and the group's options",
        "properties": {
            "params": {"type": "object", "additionalProperties": _ref("TensorSpec")},
            "reason": {"type": ["string", "null"]},
        },
        "additionalProperties": True,
    },
    "Change": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "step": {"type": "integer"},
            "group": {"type": "integer"},
            "field": {"type": "string"},
            "old": {},
            "new": {},
            "time": {"type": "string"},
            "reason": {"type": ["string", "null"]},
        },
    },
    "ChangeList": {
        "type": "object",
        "properties": {
            "changes": {"type": "array", "items": _ref("Change")},
            "next": {"type": ["integer", "null"]},
        },
    },
    "StepMetrics": {
        "type": "object",
        "description": "an applied step's norms (2-norms; grad_norm before clipping)",
        "properties": {
            "grad_norm": _FLOAT,
            "update_norm": _FLOAT,
            "param_norm": _FLOAT,
            "loss": _FLOAT,
        },
    },
    "StepRecord": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "step": {"type": "integer"},
            "time": {"type": "string"},
            "lr": {"type": "array", "items": _FLOAT},
            "applied": {"type": "boolean"},
            "skipped": {"type": ["string", "null"]},
            "metrics": {"anyOf": [_ref("StepMetrics"), {"type": "null"}]},
        },
    },
    "StepList": {
        "type": "object",
        "properties": {
            "steps": {"type": "array", "items": _ref("StepRecord")},
            "next": {"type": ["integer", "null"]},
        },
    },
    "ScheduleStep": {
        "type": "object",
        "properties": {"metric": _NULLABLE_NUMBER},
        "additionalProperties": False,
    },
    "PreviewRequest": {
        "type": "object",
        "required": ["optimizer", "steps"],
        "properties": {
            "optimizer": _ref("NamedConfig"),
            "schedule": {"anyOf": [_ref("NamedConfig"), {"type": "null"}]},
            "steps": {"type": "integer", "minimum": 1, "maximum": 100_000},
            "param_groups": {"type": "array", "items": _OBJECT},
            "metrics": {
                "type": "array",
                "items": {"type": "number"},
                "description": "one monitored value per step, for ReduceLROnPlateau",
            },
        },
        "additionalProperties": False,
    },
    "Preview": {
        "type": "object",
        "required": ["lr"],
        "properties": {
            "lr": {
                "type": "array",
                "items": {"type": "array", "items": _FLOAT},
                "description": "lr per step (outer) per group (inner)",
            },
            "optimizers": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the optimizer stepping each group: its own, or the session's",
            },
        },
    },
    "Catalog": {
        "type": "object",
        "additionalProperties": {"type": "array", "items": _OBJECT},
        "description": "{optimizers|schedules: [{name, args: [{name, type, default, ...}]}]}",
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}


def _json(name: str) -> dict[str, Any]:
    return {JSON_TYPE: {"schema": _ref(name)}}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    content = {PROBLEM_JSON: {"schema": _ref("Problem")}}
    described = {
        400: "Unreadable request (malformed body or header)",
        401: "Missing or invalid API key",
        404: "No such session for this tenant",
        406: "No acceptable response type",
        408: "The body stopped arriving (body_timeout_s); the connection is closed",
        409: "Conflict (step in flight, key applied long ago, params not held)",
        412: "If-Match names another step",
        413: "Body larger than the configured limit",
        415: "Unsupported Content-Type",
        422: "Invalid request (fields named in errors)",
        503: "Store unavailable, the session is damaged (session-damaged), or too many "
        "request bodies in flight (Retry-After)",
    }
    return {s: {"description": described[s], "content": content} for s in statuses}


_COMMON = (401, 406, 422)
_BODY = (400, 408, 413, 415, 503)
"""What any route that reads a body may answer, besides its own."""


def _request(content: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"requestBody": {"required": required, "content": content}}


def create_request() -> dict[str, Any]:
    return _request(
        {
            JSON_TYPE: {"schema": _ref("SessionCreate")},
            SAFETENSORS_TYPE: {
                "schema": _BINARY,
                "description": 'initial params with __metadata__["session"], or a checkpoint',
            },
        }
    )


def step_request() -> dict[str, Any]:
    parameters = [
        {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "return",
            "in": "query",
            "required": False,
            "description": "what the reply carries: deltas (new - old), the new params, or none",
            "schema": {"enum": ["delta", "params", "none"], "default": "delta"},
        },
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "a retry with the same key and body gets the stored reply",
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
        },
        {
            "name": "If-Match",
            "in": "header",
            "required": False,
            "description": 'apply only if the session is at this step ("<step>")',
            "schema": {"type": "string"},
        },
    ]
    return {"parameters": parameters} | _request(
        {
            JSON_TYPE: {"schema": _ref("StepRequest")},
            SAFETENSORS_TYPE: {
                "schema": _BINARY,
                "description": "grads by tensor name, params as params/<name>, loss in metadata",
            },
        }
    )


def schedule_step_request() -> dict[str, Any]:
    return _request({JSON_TYPE: {"schema": _ref("ScheduleStep")}}, required=False)


def group_edit_request() -> dict[str, Any]:
    return _request({JSON_TYPE: {"schema": _ref("GroupEdit")}})


def group_add_request() -> dict[str, Any]:
    return _request({JSON_TYPE: {"schema": _ref("GroupAdd")}})


def changes_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "One page of the change log", "content": _json("ChangeList")},
        **_problems(*_COMMON, 404, 503),
    }


def history_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "One page of the step history", "content": _json("StepList")},
        **_problems(*_COMMON, 404, 503),
    }


def preview_request() -> dict[str, Any]:
    return _request({JSON_TYPE: {"schema": _ref("PreviewRequest")}})


def create_responses() -> dict[int | str, dict[str, Any]]:
    return {
        201: {"description": "Created", "content": _json("Session")},
        **_problems(*_COMMON, *_BODY, 503),
    }


def session_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "The session", "content": _json("Session")},
        **_problems(*_COMMON, *_BODY, 404, 503),
    }


def list_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "One page", "content": _json("SessionList")},
        **_problems(*_COMMON),
    }


def delete_responses() -> dict[int | str, dict[str, Any]]:
    return {204: {"description": "Deleted"}, **_problems(401, 404, 422, 503)}


def step_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "Applied (or skipped, or replayed)",
            "content": {**_json("StepReply"), SAFETENSORS_TYPE: {"schema": _BINARY}},
        },
        **_problems(*_COMMON, *_BODY, 404, 409, 412, 503),
    }


def params_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "The held parameters",
            "content": {**_json("Params"), SAFETENSORS_TYPE: {"schema": _BINARY}},
        },
        **_problems(*_COMMON, 404, 409, 503),
    }


def state_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "Checkpoint", "content": {SAFETENSORS_TYPE: {"schema": _BINARY}}},
        **_problems(*_COMMON, 404, 503),
    }


def preview_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "lr per step", "content": _json("Preview")},
        **_problems(*_COMMON, *_BODY),
    }


def health_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"description": "Alive", "content": _json("Status")}}


def ready_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"description": "Ready", "content": _json("Status")}, **_problems(503)}


def metrics_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }


def catalog_responses() -> dict[int | str, dict[str, Any]]:
    return {200: {"description": "The catalog", "content": _json("Catalog")}, **_problems(*_COMMON)}

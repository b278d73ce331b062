"""Federated request bodies to domain values, and their answers back to bodies.

An update, as JSON::

    {"client_id": "c7", "round": 3, "num_examples": 120, "params": {name: values}}
    {"client_id": "c7", "base_version": 41, "delta": {name: values}}         (async)

or as safetensors: tensors named ``params/<name>`` (or all ``delta/<name>``) and
``__metadata__`` with ``client_id``, ``round`` or ``base_version``, ``num_examples``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from service.api.problems import InvalidRequest
from service.api.wire import parse_json_object, reject_unknown_fields
from service.codec import json_tensors, safetensors, strict_json
from service.codec.json_tensors import array_from_json, array_to_json
from service.sessions.federated.models import RoundParams, UpdateRequest

CLIENT_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
FORMS = ("params", "delta")
INTEGER_FIELDS = ("round", "base_version", "num_examples")
UPDATE_KEYS = frozenset({"client_id", *INTEGER_FIELDS, *FORMS})
MAX_INTEGER = 2**53
_FLOAT64 = np.dtype(np.float64)


def _client_id(value: Any) -> str:
    if not isinstance(value, str) or CLIENT_ID.fullmatch(value) is None:
        raise InvalidRequest(
            "client_id must be 1-128 characters from A-Z a-z 0-9 _ . : @ -",
            [("client_id", "required, 1-128 characters from A-Z a-z 0-9 _ . : @ -")],
        )
    return value


def _integer(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INTEGER:
        raise InvalidRequest(
            f"{field} must be an integer from 0 to 2^53", [(field, "must be a whole number")]
        )
    return value


def _one_form(present: list[str]) -> str:
    if len(present) != 1:
        raise InvalidRequest(
            "an update carries exactly one of 'params' (the client's new values) or "
            "'delta' (new minus the values it trained from)",
            [(form, "give exactly one of params, delta") for form in (present or list(FORMS))],
        )
    return present[0]


def update_from_json(body: bytes) -> UpdateRequest:
    document = parse_json_object(body)
    reject_unknown_fields(document, UPDATE_KEYS, "update fields")
    form = _one_form([f for f in FORMS if f in document])
    raw = document[form]
    if not isinstance(raw, dict):
        raise InvalidRequest(
            f"{form} must be an object of tensor name to values",
            [(form, "must be an object of tensor name to values")],
        )
    check_bools = json_tensors.may_hold_bools(body)
    tensors = {
        name: array_from_json(values, None, _FLOAT64, f"{form}.{name}", check_bools=check_bools)
        for name, values in raw.items()
    }
    return UpdateRequest(
        client_id=_client_id(document.get("client_id")),
        form=form,
        tensors=tensors,
        num_examples=_integer(document.get("num_examples"), "num_examples"),
        round=_integer(document.get("round"), "round"),
        base_version=_integer(document.get("base_version"), "base_version"),
    )


def _metadata_integer(metadata: dict[str, str], field: str) -> int | None:
    text = metadata.get(field)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 16:
        raise InvalidRequest(
            f'__metadata__ "{field}" must be a whole number', [(field, "must be a whole number")]
        )
    return _integer(int(text), field)


def update_from_safetensors(body: bytes, max_tensors: int) -> UpdateRequest:
    tensors, metadata = safetensors.decode(body, max_tensors=max_tensors)
    forms: dict[str, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        form, slash, tensor = name.partition("/")
        if not slash or form not in FORMS:
            raise InvalidRequest(
                f"update tensor {name!r} must be named params/<name> or delta/<name>",
                [(name, "must be named params/<name> or delta/<name>")],
            )
        forms.setdefault(form, {})[tensor] = array
    form = _one_form(sorted(forms))
    return UpdateRequest(
        client_id=_client_id(metadata.get("client_id")),
        form=form,
        tensors=forms[form],
        num_examples=_metadata_integer(metadata, "num_examples"),
        round=_metadata_integer(metadata, "round"),
        base_version=_metadata_integer(metadata, "base_version"),
    )


def _head(params: RoundParams) -> dict[str, Any]:
    return {"mode": params.mode, "round": params.round, "version": params.version}


def round_params_json(params: RoundParams) -> bytes:
    head = strict_json.dumps(_head(params))[:-1]
    parts = [
        json.dumps(name).encode() + b":" + array_to_json(array)
        for name, array in params.tensors.items()
    ]
    return head.encode() + b',"params":{' + b",".join(parts) + b"}}"


def round_params_safetensors(params: RoundParams) -> bytes:
    metadata = {k: "" if v is None else str(v) for k, v in _head(params).items()}
    return safetensors.encode(params.tensors, metadata)

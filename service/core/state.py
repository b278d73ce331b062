"""State records: typed dataclasses of numpy arrays and JSON scalars.

Every optimizer keeps its state in a dataclass whose fields are arrays, lists of arrays
(one per tensor of the group), or JSON-ready scalars. ``to_flat`` and ``from_flat`` turn
any such record into named arrays plus a JSON dict and back, losslessly, which is what
checkpoints and durable snapshots are built from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import numpy as np

R = TypeVar("R")

_LAYOUT = "__layout__"


def to_flat(record: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Split a state record into ``{name: array}`` and ``{name: json_scalar}``.

    Array names are ``<prefix><field>`` for an array field and ``<prefix><field>.<i>`` for
    a list of arrays. The scalar dict carries a layout entry so that ``from_flat`` knows
    which fields were arrays, lists of arrays (with their length) or ``None``.
    """
    arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray):
            arrays[prefix + f.name] = value
            layout[f.name] = "array"
        elif isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
            for i, v in enumerate(value):
                arrays[f"{prefix}{f.name}.{i}"] = v
            layout[f.name] = len(value)
        elif isinstance(value, list) and not value and is_array_list(f):
            layout[f.name] = 0
        else:
            scalars[f.name] = _json_scalar(value, f.name)
    scalars[_LAYOUT] = layout
    return arrays, scalars


def from_flat(
    cls: type[R], arrays: dict[str, np.ndarray], scalars: dict[str, Any], prefix: str = ""
) -> R:
    """Rebuild a record of type ``cls`` from the output of :func:`to_flat`."""
    layout: dict[str, Any] = scalars.get(_LAYOUT, {})
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = layout.get(f.name)
        if kind == "array":
            values[f.name] = arrays[prefix + f.name]
        elif isinstance(kind, int):
            values[f.name] = [arrays[f"{prefix}{f.name}.{i}"] for i in range(kind)]
        elif f.name in scalars:
            values[f.name] = scalars[f.name]
    return cls(**values)


def is_array_list(f: dataclasses.Field[Any]) -> bool:
    """Whether a state field is declared as a list of arrays (one entry per tensor)."""
    return "ndarray" in str(f.type) and "list" in str(f.type)


def _json_scalar(value: Any, name: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_json_scalar(v, name) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_scalar(v, name) for k, v in value.items()}
    raise TypeError(f"state field {name!r} holds {type(value).__name__}, not array or JSON")

"""Declared hyperparameters: names, types and defaults, resolved from user input.

Every optimizer and schedule declares its arguments as a tuple of :class:`Arg`. The same
declaration fills in defaults, type-checks what a client sent and feeds the catalog
(``GET /v1/optimizers``), so the three can never disagree.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.core.errors import InvalidHyperparameter, UnknownArguments

Kind = Literal["float", "int", "bool", "str", "float_pair", "float_list", "int_list", "any"]


@dataclass(frozen=True)
class Arg:
    """One constructor argument, named as torch names it."""

    name: str
    kind: Kind
    default: Any
    doc: str = ""
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False

    def describe(self) -> dict[str, Any]:
        """The catalog entry for this argument (JSON-ready)."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind, "doc": self.doc}
        if self.required:
            out["required"] = True
        else:
            out["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
        if self.nullable:
            out["nullable"] = True
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
"""Integer hyperparameters are 64-bit, as torch's are once they reach a tensor or C++."""


def shown(value: Any) -> str:
    """``repr`` for a message, with an integer too long to print usefully summarized."""
    if _is_int(value) and not -(10**20) < value < 10**20:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:  # beyond Python's limit on converting an int to text
            return f"an integer of {value.bit_length()} bits"
    return repr(value)


def as_float(value: Any, field: str) -> float:
    """A JSON number as a float: an integer beyond the float range is refused, not an
    ``OverflowError``."""
    try:
        return float(value)
    except OverflowError:
        raise InvalidHyperparameter(
            field, f"{field} is too large for a float: {shown(value)}", value
        ) from None


def as_int(value: Any, field: str) -> int:
    """A JSON integer that fits in 64 bits."""
    if not INT_MIN <= value <= INT_MAX:
        raise InvalidHyperparameter(
            field, f"{field} must fit in a 64-bit integer, got {shown(value)}", value
        )
    return int(value)


def _shown_list(values: Sequence[Any]) -> str:
    return "[" + ", ".join(shown(v) for v in values) + "]"


_NAMED_FLOATS = {
    **{name: math.inf for name in ("inf", "+inf", "infinity", "+infinity")},
    **{name: -math.inf for name in ("-inf", "-infinity")},
    "nan": math.nan,
}
"""Non-finite floats by name, case-insensitively: JSON has no token for them, so a client
may write ``"inf"`` wherever torch takes ``float("inf")`` (and optserve writes them so)."""


def _named_float(value: Any) -> Any:
    """``"inf"``, ``"Infinity"``, ``"-inf"``, ``"nan"`` as floats; anything else unchanged."""
    if isinstance(value, str):
        return _NAMED_FLOATS.get(value.strip().lower(), value)
    return value


def coerce(arg: Arg, value: Any, where: str = "") -> Any:
    """Check ``value`` against ``arg`` and return it in canonical Python form."""
    field = f"{where}{arg.name}"
    if value is None:
        if arg.nullable:
            return None
        raise InvalidHyperparameter(field, f"{field} must not be null", value)
    if arg.kind == "float":
        value = _named_float(value)
        if not _is_number(value):
            raise InvalidHyperparameter(
                field, f"{field} must be a number, got {shown(value)}", value
            )
        number = as_float(value, field)
        if math.isnan(number):
            raise InvalidHyperparameter(field, f"Invalid {arg.name} value: {value}", value)
        return number
    if arg.kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidHyperparameter(
                field, f"{field} must be an integer, got {shown(value)}", value
            )
        return as_int(value, field)
    if arg.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidHyperparameter(
                field, f"{field} must be a boolean, got {shown(value)}", value
            )
        return value
    if arg.kind == "str":
        if not isinstance(value, str):
            raise InvalidHyperparameter(
                field, f"{field} must be a string, got {shown(value)}", value
            )
        if arg.choices is not None and value not in arg.choices:
            allowed = ", ".join(arg.choices)
            raise InvalidHyperparameter(
                field, f"{field} must be one of {allowed}, got {value!r}", value
            )
        return value
    if arg.kind in ("float_pair", "float_list", "int_list"):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise InvalidHyperparameter(field, f"{field} must be a list, got {shown(value)}", value)
        item_ok = _is_int if arg.kind == "int_list" else _is_number
        if arg.kind != "int_list":
            value = [_named_float(v) for v in value]
        if not all(item_ok(v) for v in value):
            raise InvalidHyperparameter(
                field, f"{field} has a non-numeric entry: {_shown_list(value)}", value
            )
        # As for a single float: no range check can refuse NaN (every comparison is
        # false), and an argument without one (CAME's eps, Rprop's step_sizes) would
        # take it and turn every later step into NaN.
        if any(isinstance(v, float) and math.isnan(v) for v in value):
            raise InvalidHyperparameter(
                field, f"Invalid {arg.name} value: {_shown_list(value)}", value
            )
        if arg.kind == "float_pair":
            if len(value) != 2:
                raise InvalidHyperparameter(
                    field,
                    f"{field} must have exactly two entries, got {_shown_list(value)}",
                    value,
                )
            return (as_float(value[0], field), as_float(value[1], field))
        if arg.kind == "int_list":
            return [as_int(v, field) for v in value]
        return [as_float(v, field) for v in value]
    return value


def resolve(
    args: Sequence[Arg],
    given: Mapping[str, Any],
    *,
    where: str = "",
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """Fill defaults, reject unknown names and coerce types. Range checks are the caller's."""
    known = {a.name for a in args}
    unknown = [name for name in given if name not in known and name not in ignore]
    if unknown:
        raise UnknownArguments(
            [(f"{where}{name}", _closest(name, known)) for name in unknown],
            sorted(known),
            given[unknown[0]],
        )
    out: dict[str, Any] = {}
    for arg in args:
        if arg.name in given:
            out[arg.name] = coerce(arg, given[arg.name], where)
        elif arg.required:
            raise InvalidHyperparameter(
                f"{where}{arg.name}", f"missing required argument {where}{arg.name!r}"
            )
        else:
            out[arg.name] = arg.default
    return out


def _closest(name: str, known: set[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def check(condition: bool, argument: str, message: str, value: Any = None) -> None:
    """Raise :class:`InvalidHyperparameter` unless ``condition`` holds."""
    if not condition:
        raise InvalidHyperparameter(argument, message, value)


_RANGE_MESSAGES = {"lr": "Invalid learning rate: {}", "eps": "Invalid epsilon value: {}"}
"""torch's wording where it is not ``Invalid <name> value: <value>``."""


def check_non_negative(hp: Mapping[str, Any], names: Sequence[str], where: str = "") -> None:
    """torch's ``0.0 <= value`` checks on ``names``, in the given order, with its messages."""
    for name in names:
        value = hp[name]
        message = _RANGE_MESSAGES.get(name, f"Invalid {name} value: {{}}").format(value)
        check(value >= 0.0, f"{where}{name}", message, value)

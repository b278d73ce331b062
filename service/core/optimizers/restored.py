"""Checks of a checkpoint's optimizer scalars against the form a fresh state keeps.

A checkpoint is client input: its JSON scalars (a step count, per-tensor flags and
constants) must be of the type and length the rule keeps before a step reads them, or a
step fails midway on a state that was accepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def mismatch(restored: Any, fresh: Any, names: Sequence[str]) -> str:
    """The first of the record's fields ``names`` whose restored value has not the form of
    ``fresh``'s (:func:`same_form`), described; ``""`` when all have it."""
    for name in names:
        value, model = getattr(restored, name), getattr(fresh, name)
        if not same_form(value, model):
            return f"{name} {value!r} is not of the form {model!r}"
    return ""


def same_form(value: Any, model: Any) -> bool:
    """Whether ``value`` has ``model``'s type (any number for a float) and, for a list, its
    length with every entry of its entry's form."""
    if isinstance(model, bool):
        return isinstance(value, bool)
    if isinstance(model, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(model, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(model, str):
        return isinstance(value, str)
    if isinstance(model, list):
        return (
            isinstance(value, list)
            and len(value) == len(model)
            and all(same_form(v, m) for v, m in zip(value, model, strict=True))
        )
    return True

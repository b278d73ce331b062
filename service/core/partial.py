"""Partial steps: torch's per-tensor skip of parameters that have no gradient.

torch keeps an optimizer's state per parameter. A tensor whose ``grad`` is None is left
out of ``step()``: its moments, its accumulators and its own step count stay where they
were while the other tensors of its group advance, and it does not move, not even by
weight decay.

optserve keeps a group's state as one record for all of the group's tensors (one ``step``
for the group, lists of arrays in the group's tensor order), which is what makes whole
steps fast. A partial step splits the group into :class:`Parts`: the tensors whose
records agree in everything but their arrays share one part, and each part is updated as
a group of its own. Parts that agree again are merged, so a group whose tensors have all
stepped equally often is a single record again.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.errors import InvalidInput
from service.core.optimizers.base import Optimizer, Shape
from service.core.state import is_array_list

Positions = tuple[int, ...]
"""Positions of tensors within their group, ascending."""


@dataclass
class Parts:
    """A group whose tensors' states have diverged: one record per set of tensors."""

    parts: list[tuple[Positions, Any]]
    """Disjoint position sets covering the group, each with its own state record."""


GroupState = Any
"""An optimizer's record for the whole group, or :class:`Parts`."""


def _list_fields(record: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(record) if is_array_list(f)]


def _scalar_fields(record: Any) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(record) if not is_array_list(f)]


def _entries(
    optimizer: Optimizer[Any], shapes: Sequence[Shape], record: Any, name: str
) -> dict[int, np.ndarray] | None:
    """Position -> array of one list field, or None while the field is unused (empty)."""
    values = getattr(record, name)
    if not values:
        return None
    owners = optimizer.list_members(name, shapes)
    if len(owners) != len(values):
        raise AssertionError(f"{optimizer.name} state {name!r} is not aligned with its tensors")
    return dict(zip(owners, values, strict=True))


def select(
    optimizer: Optimizer[Any], shapes: Sequence[Shape], record: Any, positions: Positions
) -> Any:
    """The record of the tensors at ``positions``, sharing their arrays with ``record``."""
    for f in _scalar_fields(record):
        if isinstance(getattr(record, f.name), np.ndarray):
            raise InvalidInput(
                f"{optimizer.name} keeps state over all of a group's tensors together, so it "
                "cannot step some of them without the others",
                "grads",
            )
    values: dict[str, Any] = {
        f.name: copy.deepcopy(getattr(record, f.name)) for f in _scalar_fields(record)
    }
    for f in _list_fields(record):
        entries = _entries(optimizer, shapes, record, f.name)
        values[f.name] = [] if entries is None else [entries[p] for p in positions if p in entries]
    return type(record)(**values)


def _part_entries(
    optimizer: Optimizer[Any], shapes: Sequence[Shape], positions: Positions, record: Any, name: str
) -> dict[int, np.ndarray] | None:
    """Like :func:`_entries` for a part, keyed by group positions."""
    local = _entries(optimizer, [shapes[p] for p in positions], record, name)
    if local is None:
        return None
    return {positions[i]: a for i, a in local.items()}


def _mergeable(a: Any, b: Any) -> bool:
    for f in _scalar_fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if type(x) is not type(y) or x != y:
            return False
    return all(bool(getattr(a, f.name)) == bool(getattr(b, f.name)) for f in _list_fields(a))


def _combine(
    optimizer: Optimizer[Any],
    shapes: Sequence[Shape],
    a: tuple[Positions, Any],
    b: tuple[Positions, Any],
) -> tuple[Positions, Any]:
    positions = tuple(sorted(a[0] + b[0]))
    values: dict[str, Any] = {f.name: getattr(a[1], f.name) for f in _scalar_fields(a[1])}
    for f in _list_fields(a[1]):
        ea = _part_entries(optimizer, shapes, *a, f.name)
        eb = _part_entries(optimizer, shapes, *b, f.name)
        if ea is None or eb is None:
            values[f.name] = []
        else:
            joined = {**ea, **eb}
            values[f.name] = [joined[p] for p in positions if p in joined]
    return positions, type(a[1])(**values)


def normalize(optimizer: Optimizer[Any], shapes: Sequence[Shape], parts: Parts) -> GroupState:
    """Merge the parts that agree; a single part covering the group becomes its record."""
    merged: list[tuple[Positions, Any]] = []
    for part in sorted(parts.parts, key=lambda p: p[0][0]):
        for i, other in enumerate(merged):
            if _mergeable(other[1], part[1]):
                merged[i] = _combine(optimizer, shapes, other, part)
                break
        else:
            merged.append(part)
    if len(merged) == 1:
        return merged[0][1]
    return Parts(sorted(merged, key=lambda p: p[0][0]))


def update_group(
    optimizer: Optimizer[Any],
    shapes: Sequence[Shape],
    state: GroupState,
    present: Positions,
    grads: Sequence[np.ndarray | None],
    params: Sequence[np.ndarray | None] | None,
    hp: Any,
    out: Sequence[np.ndarray],
) -> GroupState:
    """One step of the group's tensors at ``present``; the others keep their state.

    ``grads``, ``params`` and ``out`` are indexed by group position (entries of absent
    tensors are not read; their ``out`` is zeroed).
    """
    everyone = tuple(range(len(shapes)))
    if present == everyone and not isinstance(state, Parts):
        return optimizer.update(_given(grads, everyone), state, _maybe(params, everyone), hp, out)
    parts = state.parts if isinstance(state, Parts) else [(everyone, state)]
    stepped = set(present)
    for p in everyone:
        if p not in stepped:
            out[p].fill(0)
    result: list[tuple[Positions, Any]] = []
    for positions, record in parts:
        inside = tuple(p for p in positions if p in stepped)
        outside = tuple(p for p in positions if p not in stepped)
        part_shapes = [shapes[p] for p in positions]
        local = {p: i for i, p in enumerate(positions)}
        if outside:
            result.append(
                (outside, select(optimizer, part_shapes, record, tuple(local[p] for p in outside)))
            )
        if not inside:
            continue
        sub = (
            record
            if not outside
            else select(optimizer, part_shapes, record, tuple(local[p] for p in inside))
        )
        sub = optimizer.update(
            _given(grads, inside), sub, _maybe(params, inside), hp, [out[p] for p in inside]
        )
        result.append((inside, sub))
    return normalize(optimizer, shapes, Parts(result))


def _given(arrays: Sequence[np.ndarray | None], positions: Positions) -> list[np.ndarray]:
    chosen = [arrays[p] for p in positions]
    assert all(a is not None for a in chosen)
    return chosen  # type: ignore[return-value]


def _maybe(
    arrays: Sequence[np.ndarray | None] | None, positions: Positions
) -> list[np.ndarray] | None:
    return None if arrays is None else _given(arrays, positions)

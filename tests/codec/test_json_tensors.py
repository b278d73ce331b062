"""JSON tensors: exact float32 text, shapes, and nothing but codec errors for bad values."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.codec import json_tensors
from service.codec.errors import InvalidValues
from service.codec.json_tensors import array_from_json, array_to_json, contains_bool

F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

float32_arrays = hnp.arrays(
    F32,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
    elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(array=float32_arrays)
def test_float32_text_round_trips_bit_for_bit(array: np.ndarray) -> None:
    text = array_to_json(array)
    parsed = np.asarray(json.loads(text), dtype=np.float64).astype(np.float32)
    assert parsed.shape == array.shape
    # Compare bits: -0.0 must stay -0.0.
    assert parsed.tobytes() == array.tobytes()


def test_float32_text_for_every_exponent_and_edge() -> None:
    edges = [0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, 1.0, 9.999999e8, 1e9]
    powers = [10.0**k for k in range(-45, 39)]
    near = [np.nextafter(np.float32(p), np.float32(np.inf)) for p in powers]
    array = np.array([*edges, *powers, *near], dtype=np.float32)
    array = array[np.isfinite(array)]
    parsed = np.asarray(json.loads(array_to_json(array)), dtype=np.float64).astype(np.float32)
    assert parsed.tobytes() == array.tobytes()


@settings(max_examples=200, deadline=None)
@given(
    array=hnp.arrays(
        st.sampled_from([F64, np.dtype(np.int64), F32]),
        # Nested lists cannot carry a shape like (0, 3): the session's spec does.
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
    )
)
def test_any_array_encodes_to_json_of_its_values(array: np.ndarray) -> None:
    parsed = np.asarray(json.loads(array_to_json(array)), dtype=array.dtype)
    assert parsed.shape == array.shape
    assert np.array_equal(parsed, array, equal_nan=array.dtype.kind == "f")


@settings(max_examples=200, deadline=None)
@given(array=float32_arrays, flat=st.booleans())
def test_decoding_accepts_nested_or_flat(array: np.ndarray, flat: bool) -> None:
    values = array.reshape(-1).tolist() if flat else array.tolist()
    decoded = array_from_json(values, array.shape, F32, "x")
    assert decoded.dtype == F32 and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()
    assert decoded.flags.writeable


def _nested(depth: int) -> Any:
    value: Any = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        "1.0",
        None,
        True,
        {"a": 1},
        [1, "2"],
        [1, None],
        [1, True],
        [[1.0, 2.0], [3.0]],
        [[1.0], 2.0],
        [10**400],
        _nested(70),
    ],
)
def test_bad_values_raise_invalid_values(value: Any) -> None:
    with pytest.raises(InvalidValues) as raised:
        array_from_json(value, None, F32, "grads.w")
    assert raised.value.field == "grads.w"


def test_shape_mismatch_names_the_field() -> None:
    with pytest.raises(InvalidValues, match=r"shape \[2, 2\], expected \[3\]"):
        array_from_json([[1, 2], [3, 4]], (3,), F32, "grads.w")
    with pytest.raises(InvalidValues):
        array_from_json([1, 2, 3], (2, 2), F32, "grads.w")


def test_out_of_range_numbers_become_inf_for_the_finiteness_check() -> None:
    decoded = array_from_json([1e300, -1e300], None, F32, "x")
    assert np.isinf(decoded).all()


def test_bool_scan_can_be_skipped_when_the_text_has_none() -> None:
    assert contains_bool([[1, 2], [True]])
    assert not contains_bool([[1, 2], [3.5]])
    # Without the scan numpy would read True as 1: the caller skips it only when safe.
    assert array_from_json([1, True], None, F64, "x", check_bools=False).tolist() == [1.0, 1.0]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None)
@given(value=json_values, shape=st.none() | st.lists(st.integers(0, 4), max_size=3).map(tuple))
def test_arbitrary_json_decodes_or_raises_invalid_values(value: Any, shape: Any) -> None:
    try:
        decoded = array_from_json(value, shape, F32, "x")
    except InvalidValues:
        return
    assert decoded.dtype == F32
    if shape is not None:
        assert decoded.shape == shape
    assert math.prod(decoded.shape) == decoded.size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"grads": {"w": [1.0, 2e-05, NaN, -Infinity]}}', False),
        (b'{"grads": {"w": [1.0, true]}}', True),
        (b'{"grads": {"w": [false, 1]}}', True),
        (b'{"grads": {"layer.full.out": [1.5]}, "loss": 0.25}', False),  # u and l in names
        (b'{"grads": {"true_false": [1.5]}}', True),  # the words in a name: checked anyway
        (b"true", True),
        (b"ul" * 100 + b"true", True),  # past the letters checked one by one
        (b"ul" * 100, False),
        (b"", False),
    ],
)
def test_may_hold_bools_misses_no_boolean(text: bytes, expected: bool) -> None:
    assert json_tensors.may_hold_bools(text) is expected
    if not expected:
        assert b"true" not in text and b"false" not in text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"true", b"false", b"u", b"l", b"t", b"ru", b"1.5", b",", b"al"])))
def test_may_hold_bools_is_false_only_without_the_words(pieces: list[bytes]) -> None:
    text = b"".join(pieces)
    if not json_tensors.may_hold_bools(text):
        assert b"true" not in text and b"false" not in text
    else:
        assert b"true" in text or b"false" in text

"""The client's safetensors codec: round trips, interop with the reference package, and
strict rejection of malformed bytes."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from optserve_client import safetensors
from optserve_client.safetensors import SafetensorsError, decode, encode
from safetensors.numpy import load as reference_load
from safetensors.numpy import save as reference_save

DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 50).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_values_dtype_and_shape(dtype: str) -> None:
    tensors = {"a": sample(dtype, (3, 4)), "b.c": sample(dtype, (0,)), "s": sample(dtype, ())}
    decoded, metadata = decode(encode(tensors, {"step": "7"}))
    assert metadata == {"step": "7"}
    assert set(decoded) == set(tensors)
    for name, value in tensors.items():
        assert decoded[name].dtype == value.dtype
        assert decoded[name].shape == value.shape
        np.testing.assert_array_equal(decoded[name], value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_package_reads_what_the_client_writes(dtype: str) -> None:
    tensors = {"w": sample(dtype, (5, 2)), "b": sample(dtype, (2,), seed=1)}
    loaded = reference_load(encode(tensors))
    for name, value in tensors.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_client_reads_what_the_reference_package_writes(dtype: str) -> None:
    tensors = {"w": sample(dtype, (2, 3, 2)), "z": sample(dtype, (1,), seed=3)}
    decoded, metadata = decode(reference_save(tensors, metadata={"loss": "0.5"}))
    assert metadata == {"loss": "0.5"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded[name], value)


def test_header_is_padded_so_data_is_eight_byte_aligned() -> None:
    data = encode({"x": np.arange(3, dtype=np.float64)}, {"k": "v"})
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0


def test_big_endian_and_non_contiguous_input_is_written_little_endian_c_order() -> None:
    base = np.arange(12, dtype=">f4").reshape(3, 4)
    view = base.T
    decoded, _ = decode(encode({"t": view}))
    np.testing.assert_array_equal(decoded["t"], view)
    assert decoded["t"].dtype == np.float32


def test_bf16_is_widened_exactly_to_float32() -> None:
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    top_halves = (values.view(np.uint32) >> 16).astype("<u2")
    header = {"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    decoded, _ = decode(struct.pack("<Q", len(raw)) + raw + top_halves.tobytes())
    assert decoded["x"].dtype == np.float32
    np.testing.assert_array_equal(decoded["x"], values)


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(TypeError, match="complex"):
        encode({"c": np.zeros(2, dtype=np.complex64)})


def handmade(header: dict[str, object], body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "fewer than 8 bytes"),
        (handmade({"x": GOOD_ENTRY}, b"\0" * 8, length=10_000), "exceeds"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (handmade({"x": GOOD_ENTRY}, b"\0" * 4), "past the end"),
        (handmade({"x": GOOD_ENTRY}, b"\0" * 12), "trailing bytes"),
        (handmade({"x": {**GOOD_ENTRY, "dtype": "C64"}}, b"\0" * 8), "unsupported dtype"),
        (handmade({"x": {**GOOD_ENTRY, "shape": [3]}}, b"\0" * 8), "do not hold shape"),
        (handmade({"x": {**GOOD_ENTRY, "shape": [-2]}}, b"\0" * 8), "non-negative"),
        (handmade({"x": {**GOOD_ENTRY, "data_offsets": [8, 0]}}, b"\0" * 8), "data_offsets"),
        (handmade({"x": {**GOOD_ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12), "gap"),
        (
            handmade({"x": GOOD_ENTRY, "y": {**GOOD_ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12),
            "gap or overlap",
        ),
        (handmade({"x": GOOD_ENTRY, "__metadata__": {"a": 1}}, b"\0" * 8), "strings to strings"),
        (handmade({"x": "F32"}, b""), "not an object"),
        (
            struct.pack("<Q", 80)
            + b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32"}}    '
            + b"\0" * 4,
            "twice",
        ),
    ],
)
def test_malformed_input_is_refused_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(SafetensorsError, match=message):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_safetensors_error(data: bytes) -> None:
    with contextlib.suppress(SafetensorsError):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_valid_files_decode_or_fail_cleanly(data: st.DataObject) -> None:
    original = bytearray(encode({"w": np.arange(6, dtype=np.float32), "b": np.ones(2)}, {"k": "v"}))
    position = data.draw(st.integers(0, len(original) - 1))
    original[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(original)))
    try:
        tensors, _ = decode(bytes(original[:cut]))
    except SafetensorsError:
        return
    assert all(isinstance(t, np.ndarray) for t in tensors.values())


def test_decode_copies_unless_a_writable_buffer_is_handed_over() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    buffer = bytearray(safetensors.encode({"x": values}))
    copied, _ = safetensors.decode(buffer)
    shared, _ = safetensors.decode(buffer, copy=False)
    buffer[-4:] = np.float32(-1).tobytes()
    assert copied["x"][1, 2] == 5 and shared["x"][1, 2] == -1
    assert copied["x"].flags.writeable and shared["x"].flags.writeable
    read_only, _ = safetensors.decode(bytes(buffer), copy=False)
    assert read_only["x"].flags.writeable  # bytes cannot be shared writable: copied


def test_encode_parts_joined_is_encode() -> None:
    tensors = {"b": np.ones(3, np.float64), "a": np.arange(5, dtype=np.float32)}
    parts = safetensors.encode_parts(tensors, {"k": "v"})
    assert b"".join(parts) == safetensors.encode(tensors, {"k": "v"})
    assert any(isinstance(p, memoryview) for p in parts)  # the arrays, not copies

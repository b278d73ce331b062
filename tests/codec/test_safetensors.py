"""safetensors codec: round trips, interop with the reference package, strict rejection."""

from __future__ import annotations

import contextlib
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.codec.errors import MalformedBody, TooManyTensors
from service.codec.safetensors import decode, encode

reference = pytest.importorskip("safetensors.numpy")  # interop only; the codec needs none

DTYPES = ["float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


def _raw(header: dict[str, Any], buffer: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


tensor_arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0))
)
tensor_dicts = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
    tensor_arrays,
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors=tensor_dicts, metadata=st.dictionaries(st.text(), st.text(), max_size=3))
def test_round_trip_is_exact(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    decoded, meta = decode(encode(tensors, metadata))
    assert meta == metadata
    assert set(decoded) == set(tensors)
    for name, array in tensors.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].shape == array.shape
        assert decoded[name].tobytes() == np.asarray(array, order="C").tobytes()


@settings(max_examples=60, deadline=None)
@given(tensors=tensor_dicts)
def test_reference_package_reads_ours_and_we_read_theirs(tensors: dict[str, np.ndarray]) -> None:
    theirs = reference.load(encode(tensors))
    ours, _ = decode(reference.save(tensors))
    for name, array in tensors.items():
        assert ours[name].tobytes() == np.asarray(array, order="C").tobytes()
        # The reference loader widens 0-d tensors to shape (1,); compare the values.
        assert theirs[name].tobytes() == np.asarray(array, order="C").tobytes()


def test_every_tensor_starts_aligned_for_its_dtype() -> None:
    body = encode({"a": np.ones(3, np.int8), "b": np.ones(5, np.float64), "c": np.ones(1, "f4")})
    (header_len,) = struct.unpack_from("<Q", body)
    header = json.loads(body[8 : 8 + header_len])
    assert (8 + header_len) % 8 == 0
    for info in header.values():
        itemsize = {"I8": 1, "F64": 8, "F32": 4}[info["dtype"]]
        assert info["data_offsets"][0] % itemsize == 0


def test_bf16_decodes_to_float32_exactly() -> None:
    values = np.array([1.5, -2.0, 3.140625, 0.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    body = _raw({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bits.tobytes())
    decoded, _ = decode(body)
    assert decoded["x"].dtype == np.float32
    np.testing.assert_array_equal(decoded["x"], values)


def test_decoded_arrays_do_not_alias_writable_memory() -> None:
    decoded, _ = decode(encode({"x": np.arange(4.0)}))
    assert not decoded["x"].flags.writeable


def test_max_tensors_is_enforced() -> None:
    body = encode({f"t{i}": np.zeros(1) for i in range(4)})
    assert len(decode(body, max_tensors=4)[0]) == 4
    with pytest.raises(TooManyTensors):
        decode(body, max_tensors=3)


GOOD = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

MALFORMED: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("short length", b"\x01\x00"),
    ("length past end", struct.pack("<Q", 100) + b"{}"),
    ("huge length", struct.pack("<Q", 2**63) + b"{}"),
    ("not json", struct.pack("<Q", 3) + b"{x}"),
    ("not utf-8", struct.pack("<Q", 2) + b"\xff\xfe"),
    ("json array", _raw([], b"")),  # type: ignore[arg-type]
    ("truncated data", _raw(GOOD, b"\x00" * 7)),
    ("trailing bytes", _raw(GOOD, b"\x00" * 9)),
    ("gap", _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\x00" * 8)),
    (
        "overlap",
        _raw(
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\x00" * 8,
        ),
    ),
    ("size mismatch", _raw({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})),
    ("unknown dtype", _raw({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}})),
    ("negative dim", _raw({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}})),
    ("bool dim", _raw({"x": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0")),
    ("float dim", _raw({"x": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, b"\0")),
    ("reversed offsets", _raw({"x": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}})),
    ("missing key", _raw({"x": {"dtype": "U8", "shape": [0]}})),
    ("extra key", _raw({"x": {**GOOD["x"], "more": 1}}, b"\0" * 8)),
    ("entry not object", _raw({"x": [1, 2]})),
    ("metadata not strings", _raw({"__metadata__": {"a": 1}})),
    ("metadata not object", _raw({"__metadata__": "a"})),
    ("duplicate name", struct.pack("<Q", 20) + b'{"a":"1","a":"2"}   '),
    ("deep nesting", struct.pack("<Q", 200_000) + b"[" * 200_000),
]


@pytest.mark.parametrize(("case", "body"), MALFORMED, ids=[case for case, _ in MALFORMED])
def test_malformed_bodies_raise_only_malformed_body(case: str, body: bytes) -> None:
    with pytest.raises(MalformedBody):
        decode(body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bodies_decode_or_raise_malformed_body(data: st.DataObject) -> None:
    """Mutations of valid files (bit flips, truncation, splices) never escape as other errors."""
    tensors = data.draw(tensor_dicts)
    body = bytearray(encode(tensors, {"loss": "0.5"}))
    for _ in range(data.draw(st.integers(0, 4))):
        action = data.draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        if action == "flip" and body:
            at = data.draw(st.integers(0, len(body) - 1))
            body[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "truncate":
            del body[data.draw(st.integers(0, len(body))) :]
        elif action == "insert":
            at = data.draw(st.integers(0, len(body)))
            body[at:at] = data.draw(st.binary(max_size=16))
        else:
            header = data.draw(st.binary(max_size=64))
            body[:] = struct.pack("<Q", len(header)) + header + bytes(body[8:])
    try:
        decoded, _ = decode(bytes(body))
    except MalformedBody:
        return
    for array in decoded.values():
        assert isinstance(array, np.ndarray)


@settings(max_examples=300, deadline=None)
@given(
    header=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    tail=st.binary(max_size=32),
)
def test_arbitrary_json_headers_raise_only_malformed_body(header: Any, tail: bytes) -> None:
    with contextlib.suppress(MalformedBody):
        decode(_raw(header, tail))


def test_encode_rejects_reserved_name_and_unsupported_dtype() -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode({"__metadata__": np.zeros(1)})
    with pytest.raises(ValueError, match="no safetensors encoding"):
        encode({"x": np.zeros(1, np.complex64)})

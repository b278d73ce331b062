"""A small, strict safetensors reader and writer (numpy only).

The file layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``), then the
tensor bytes, little-endian and C-ordered, with offsets relative to the end of the header.

The client carries its own copy so that it depends on nothing but numpy; it reads and
writes the same files as the ``safetensors`` package. BF16 has no numpy dtype, so it is
widened to float32 on read (exactly: bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

__all__ = ["MEDIA_TYPE", "SafetensorsError", "decode", "encode", "encode_parts", "to_bfloat16"]

MEDIA_TYPE = "application/vnd.optserve.safetensors"

_HEADER_LIMIT = 100 * 1024 * 1024
"""The official reader refuses headers above 100 MB; so does this one."""

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype.newbyteorder("="): name for name, dtype in _DTYPES.items()}


class SafetensorsError(ValueError):
    """The bytes are not a well-formed safetensors file."""


def encode_parts(
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    bfloat16: Collection[str] = (),
) -> list[bytes | memoryview]:
    """Safetensors bytes as buffers to send in order: the header, then a view of each
    tensor's memory (no copy for a C-ordered array of a little-endian dtype).

    ``bfloat16`` names tensors given as ``uint16`` bfloat16 bits (:func:`to_bfloat16`),
    written with dtype ``BF16``. The views share the arrays' memory.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks: list[memoryview] = []
    offset = 0
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype_name = "BF16" if name in bfloat16 else _NAMES.get(array.dtype.newbyteorder("="))
        if dtype_name is None or (dtype_name == "BF16" and array.dtype != np.uint16):
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} has no safetensors equivalent")
        wire_dtype = np.dtype("<u2") if dtype_name == "BF16" else _DTYPES[dtype_name]
        data = np.ascontiguousarray(array, dtype=wire_dtype).reshape(-1).view(np.uint8).data
        header[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        chunks.append(data)
        offset += data.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so the tensor data starts 8-byte aligned, as the reference writer does.
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw, *(c for c in chunks if c.nbytes)]


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (and string ``metadata``) into safetensors bytes."""
    return b"".join(encode_parts(tensors, metadata))


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 as torch rounds them (to nearest, ties to even;
    NaN stays a quiet NaN), as their ``uint16`` bits."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(array), np.uint16(0x7FC0), rounded)


def decode(
    data: bytes | bytearray | memoryview, *, copy: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``({name: array}, metadata)``.

    Every header entry is validated: known dtype, non-negative integer shape, offsets that
    match the shape's byte size and tile the data section exactly, with nothing left over.
    Arrays are fresh, writable copies in native byte order; with ``copy=False`` and a
    writable ``data`` (a buffer the caller hands over) they are views of it instead.
    """
    view = memoryview(data).cast("B")
    if len(view) < 8:
        raise SafetensorsError("truncated: fewer than 8 bytes, no header length")
    (header_len,) = struct.unpack("<Q", view[:8])
    if header_len > _HEADER_LIMIT or 8 + header_len > len(view):
        raise SafetensorsError(f"header length {header_len} exceeds the {len(view)}-byte body")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = _metadata(header.pop("__metadata__", None))
    body = view[8 + header_len :]
    entries = sorted(
        ((name, _entry(name, spec)) for name, spec in header.items()),
        key=lambda item: item[1][2],
    )
    tensors: dict[str, np.ndarray] = {}
    expected_start = 0
    for name, (dtype_name, shape, (start, end)) in entries:
        if start != expected_start:
            raise SafetensorsError(f"tensor {name!r}: data_offsets leave a gap or overlap")
        if end > len(body):
            raise SafetensorsError(f"tensor {name!r}: data runs past the end of the body")
        count = math.prod(shape)
        if end - start != count * _itemsize(dtype_name):
            raise SafetensorsError(
                f"tensor {name!r}: {end - start} bytes do not hold shape {list(shape)}"
            )
        tensors[name] = _array(body[start:end], dtype_name, shape, copy)
        expected_start = end
    if expected_start != len(body):
        raise SafetensorsError(f"{len(body) - expected_start} trailing bytes after the tensors")
    return tensors, metadata


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise SafetensorsError("header names a key twice")
    return out


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise SafetensorsError("__metadata__ must map strings to strings")
    return dict(raw)


def _entry(name: str, spec: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(spec, dict):
        raise SafetensorsError(f"tensor {name!r}: header entry is not an object")
    dtype_name = spec.get("dtype")
    if dtype_name != "BF16" and dtype_name not in _DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dtype_name!r}")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape must be a list of non-negative ints")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(f"tensor {name!r}: data_offsets must be [begin, end]")
    return str(dtype_name), tuple(shape), (offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _itemsize(dtype_name: str) -> int:
    return 2 if dtype_name == "BF16" else _DTYPES[dtype_name].itemsize


def _array(raw: memoryview, dtype_name: str, shape: tuple[int, ...], copy: bool) -> np.ndarray:
    if dtype_name == "BF16":
        # bfloat16 is the top half of a float32, so widening is exact.
        halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return halves.view(np.float32).reshape(shape)
    dtype = _DTYPES[dtype_name]
    array = np.frombuffer(raw, dtype=dtype)
    # Read-only bytes are copied, so that every array returned is writable.
    if copy or raw.readonly or not array.dtype.isnative or not array.flags.aligned:
        array = array.astype(dtype.newbyteorder("="), copy=True)
    return array.reshape(shape)

"""The safetensors file format, read and written with numpy alone.

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
padded with spaces), then the data buffer. Offsets are relative to the buffer start.

Decoding is strict in the way the reference implementation is: the header must be a JSON
object with no duplicate names, every tensor's byte range must match its dtype and shape,
and the ranges must tile the buffer exactly (no gaps, no overlap, no trailing bytes).
Anything else raises :class:`MalformedBody`, so a truncated or hostile body can never
surface as an exception of another kind.

Decoded arrays are zero-copy, read-only views of the input (a writable one too) where the
data is aligned for its dtype, and aligned copies otherwise. BF16, which numpy lacks,
decodes to float32 (exactly: bf16 is the upper half of a float32).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.codec.errors import MalformedBody, TooManyTensors

MEDIA_TYPE = "application/vnd.optserve.safetensors"

MAX_HEADER_BYTES = 100_000_000
"""The reference implementation's cap; keeps a lying length from allocating gigabytes."""

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 after reading
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

_NAMES: dict[np.dtype[Any], str] = {
    dtype.newbyteorder("<"): name for name, dtype in _DTYPES.items() if name != "BF16"
}

_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})
MAX_DIMS = 64
"""numpy's limit on an array's dimensions."""
MAX_ARRAY_ELEMENTS = 2**60
"""numpy refuses a shape whose nonzero dimensions' product times the item size leaves a
signed 64-bit integer, even when another dimension is 0."""


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The safetensors name of a numpy dtype (``float32`` -> ``"F32"``)."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("<")]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors encoding") from None


def encode_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """Safetensors bytes as buffers to send in order: the header, then a view of each
    tensor's memory (no copy for C-ordered little-endian arrays).

    Tensors are laid out by descending alignment, then name, so every tensor of the buffer
    starts aligned for its dtype; the header is padded to a multiple of 8 bytes. The views
    share the arrays' memory: they are valid while the arrays are left unchanged.
    """
    arrays: list[tuple[str, np.ndarray]] = []
    for name, value in tensors.items():
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        array = np.asarray(value)
        little = array.dtype.newbyteorder("<")
        arrays.append((name, np.asarray(array, dtype=little, order="C")))
    arrays.sort(key=lambda item: (-item[1].dtype.itemsize, item[0]))

    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, array in arrays:
        header[name] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    parts: list[bytes | memoryview] = [struct.pack("<Q", len(text)) + text]
    parts.extend(array.reshape(-1).view(np.uint8).data for _, array in arrays if array.nbytes)
    return parts


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize ``tensors`` (and string ``metadata``) to safetensors bytes
    (:func:`encode_parts`, joined: one copy, straight from the arrays' memory)."""
    return b"".join(encode_parts(tensors, metadata))


def data_start(first: bytes) -> int | None:
    """Where the tensor data of a body that begins with ``first`` starts (after the
    8-byte length and the header), or None if ``first`` is too short to say."""
    if len(first) < 8:
        return None
    (header_len,) = struct.unpack_from("<Q", first, 0)
    return 8 + header_len if header_len <= MAX_HEADER_BYTES else None


def decode(
    data: bytes | bytearray | memoryview, *, max_tensors: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into ``({name: array}, metadata)``.

    Raises :class:`MalformedBody` for anything that is not a valid file, and
    :class:`TooManyTensors` (a ``MalformedBody``) when it holds more than ``max_tensors``.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(view) < 8:
        raise MalformedBody("safetensors body is shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > MAX_HEADER_BYTES:
        raise MalformedBody(f"safetensors header length {header_len} exceeds the limit")
    if 8 + header_len > len(view):
        raise MalformedBody(
            f"safetensors header length {header_len} runs past the end of the {len(view)}-byte body"
        )
    header = _parse_header(view[8 : 8 + header_len])
    metadata = _parse_metadata(header.pop("__metadata__", None))
    if max_tensors is not None and len(header) > max_tensors:
        raise TooManyTensors(len(header), max_tensors)

    buffer = view[8 + header_len :]
    entries = [(name, *_parse_entry(name, info)) for name, info in header.items()]
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    position = 0
    tensors: dict[str, np.ndarray] = {}
    for name, dtype_label, shape, begin, end in entries:
        if begin != position:
            raise MalformedBody(
                f"tensor {name!r} starts at byte {begin}, expected {position}: "
                "data offsets must tile the buffer without gaps or overlap",
                field=name,
            )
        if end > len(buffer):
            raise MalformedBody(
                f"tensor {name!r} ends at byte {end}, past the {len(buffer)}-byte buffer "
                "(truncated body?)",
                field=name,
            )
        tensors[name] = _read(buffer[begin:end], dtype_label, shape)
        position = end
    if position != len(buffer):
        raise MalformedBody(
            f"safetensors buffer has {len(buffer) - position} trailing bytes after the last tensor"
        )
    # Keep the caller's order (the header's), not the offset order used for checking.
    return {name: tensors[name] for name in header}, metadata


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedBody(f"safetensors header names {key!r} twice", field=key)
        out[key] = value
    return out


def _parse_header(raw: memoryview) -> dict[str, Any]:
    try:
        text = bytes(raw).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except MalformedBody:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedBody(f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise MalformedBody("safetensors header must be a JSON object")
    return header


def _parse_metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise MalformedBody(
            "safetensors __metadata__ must be an object of strings", field="__metadata__"
        )
    return dict(raw)


def _parse_entry(name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != _TENSOR_KEYS:
        raise MalformedBody(
            f"tensor {name!r} must be an object with exactly dtype, shape and data_offsets",
            field=name,
        )
    label, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(label, str) or label not in _DTYPES:
        raise MalformedBody(
            f"tensor {name!r} has unsupported dtype {label!r}; supported: {', '.join(_DTYPES)}",
            field=name,
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MalformedBody(
            f"tensor {name!r} shape must be a list of non-negative integers", field=name
        )
    if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) >= MAX_ARRAY_ELEMENTS:
        raise MalformedBody(
            f"tensor {name!r} shape cannot be an array: at most {MAX_DIMS} dimensions, "
            "whose nonzero ones multiply to less than 2**60",
            field=name,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise MalformedBody(
            f"tensor {name!r} data_offsets must be [begin, end] with 0 <= begin <= end",
            field=name,
        )
    begin, end = offsets
    expected = math.prod(shape) * _DTYPES[label].itemsize
    if end - begin != expected:
        raise MalformedBody(
            f"tensor {name!r} of dtype {label} and shape {shape} needs {expected} bytes, "
            f"its data_offsets span {end - begin}",
            field=name,
        )
    return label, tuple(shape), begin, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read(raw: memoryview, label: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = _DTYPES[label]
    array = np.frombuffer(raw, dtype=dtype)
    if not array.flags.aligned:
        array = array.copy()
    if label == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    # A view of a writable receive buffer must not let the step change the request.
    array.flags.writeable = False
    return array.reshape(shape)

"""Gradient checks begun while a safetensors step body arrives (``service/api/arriving.py``).

The sums taken as the bytes land must be the bits of the check's own pass, for the
gradients that qualify and for no others; a step's outcome (refused, skipped, its
``grad_norm``) must not depend on how its body arrived.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.arriving import MIN_ELEMENTS, ArrivingGradSquares
from service.codec import safetensors
from service.core import reductions
from tests.api.conftest import make_client, problem, st_body, st_headers

LARGE = MIN_ELEMENTS + 12_345


def _arrive(body: bytes, pieces: list[int]) -> tuple[ArrivingGradSquares, int]:
    """Feed ``body`` into a buffer of its length in pieces of these sizes (the last
    repeated), as ``receive_body`` does; the watcher and how much arrived."""
    buffer = memoryview(bytearray(len(body)))
    arriving = ArrivingGradSquares()
    filled, k = 0, 0
    while filled < len(body):
        size = pieces[min(k, len(pieces) - 1)]
        buffer[filled : filled + size] = body[filled : filled + size]
        filled = min(len(body), filled + size)
        arriving.progress(buffer, filled)
        k += 1
    return arriving, filled


@pytest.mark.parametrize("pieces", [[3], [5, 100_000], [1 << 20], [7, 65_536]])
def test_large_float_gradients_are_summed_as_they_arrive_with_the_checks_bits(
    pieces: list[int],
) -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "f32": rng.standard_normal(LARGE).astype(np.float32),
        "f64": rng.standard_normal((3, LARGE // 3)),
    }
    # A header a byte at a time first ([3]): it is read only once it is whole.
    arriving, filled = _arrive(st_body(tensors), pieces if pieces != [3] else [3, 4096])
    sums = arriving.result(filled)
    assert sums == {name: reductions.sum_of_squares(a) for name, a in tensors.items()}


def test_only_gradients_read_as_views_of_the_body_are_followed() -> None:
    rng = np.random.default_rng(2)
    tensors = {
        "small": rng.standard_normal(MIN_ELEMENTS - 1).astype(np.float32),
        "half": rng.standard_normal(LARGE).astype(np.float16),  # widened by the decoder
        "ints": np.arange(LARGE, dtype=np.int32),
        "params/w": rng.standard_normal(LARGE).astype(np.float32),  # a parameter
        "w": rng.standard_normal(LARGE).astype(np.float32),
    }
    arriving, filled = _arrive(st_body(tensors), [65_536])
    assert list(arriving.result(filled)) == ["w"]


def test_a_gradient_not_wholly_arrived_has_no_sum() -> None:
    tensors = {"a": np.ones(LARGE, np.float32), "b": np.ones(LARGE, np.float32)}
    body = st_body(tensors)
    buffer = memoryview(bytearray(len(body)))
    buffer[:] = body
    arriving = ArrivingGradSquares()
    short = len(body) - 4  # the last tensor's ("b": laid out by name) last element is missing
    arriving.progress(buffer, short)
    assert arriving.result(short) == {"a": float(LARGE)}


@pytest.mark.parametrize(
    "body",
    [
        b"\xff" * 8 + b"{}" * 100_000,  # a header length past the limit
        (20).to_bytes(8, "little") + b"not json at all" + b" " * 5 + b"\0" * 300_000,
        (2).to_bytes(8, "little") + b"[]" + b"\0" * 300_000,
    ],
)
def test_a_header_that_does_not_parse_is_left_to_the_decoder(body: bytes) -> None:
    arriving, filled = _arrive(body, [4096])
    assert arriving.result(filled) == {}


# -- through the server: the outcome does not depend on how the body arrived --------------


def _session(client: TestClient, dtype: str, nonfinite: str) -> str:
    config = {
        "optimizer": {"name": "Adam", "lr": 1e-3},
        "params": {"w": {"shape": [LARGE]}},
        "dtype": dtype,
        "nonfinite": nonfinite,
    }
    response = client.post("/v1/sessions", json=config)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _step(client: TestClient, sid: str, grad: np.ndarray) -> object:
    return client.post(
        f"/v1/sessions/{sid}/step", content=st_body({"w": grad}), headers=st_headers()
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_a_nonfinite_last_element_is_found_in_a_body_checked_as_it_arrived(
    bad: float, nonfinite: str
) -> None:
    grad = np.ones(LARGE, np.float32)
    grad[-1] = bad
    with make_client() as client:
        sid = _session(client, "float32", nonfinite)
        response = _step(client, sid, grad)
        if nonfinite == "error":
            problem(response, 422)
            assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0
        else:
            assert response.status_code == 200, response.text
            _, metadata = safetensors.decode(response.content)
            assert metadata["applied"] == "false"
            assert "NaN or Inf" in metadata["skipped"]


def test_the_grad_norm_is_that_of_the_check_after_arrival() -> None:
    grad = np.random.default_rng(4).standard_normal(LARGE).astype(np.float32) * 1.1
    with make_client() as client:
        sid = _session(client, "float64", "error")
        assert _step(client, sid, grad.astype(np.float64)).status_code == 200
        response = _step(client, sid, grad.astype(np.float64))
        _, metadata = safetensors.decode(response.content)
        expected = math.sqrt(reductions.sum_of_squares(grad.astype(np.float64)))
        assert json.loads(metadata["metrics"])["grad_norm"] == expected


def test_a_gradient_cast_to_the_sessions_dtype_is_checked_as_cast() -> None:
    # Finite as sent (float64), infinite once cast to the float32 session: the sum taken
    # as it arrived is of the float64 values, and must not pass the cast ones.
    grad = np.ones(LARGE)
    grad[7] = 1e39
    with make_client() as client:
        sid = _session(client, "float32", "error")
        problem(_step(client, sid, grad), 422)
        assert client.get(f"/v1/sessions/{sid}").json()["step"] == 0


def test_gradients_are_summed_whatever_order_the_header_names_them_in() -> None:
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(LARGE + k).astype(np.float32) for k in range(4)]
    header: dict[str, object] = {}
    offset = 0
    for k, a in enumerate(arrays):
        header[f"t{k}"] = {
            "dtype": "F32",
            "shape": [a.size],
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    text = json.dumps(dict(reversed(header.items()))).encode()  # the last tensor named first
    text += b" " * (-len(text) % 8)
    body = len(text).to_bytes(8, "little") + text + b"".join(a.tobytes() for a in arrays)
    arriving, filled = _arrive(body, [100_000])
    assert arriving.result(filled) == {
        f"t{k}": reductions.sum_of_squares(a) for k, a in enumerate(arrays)
    }

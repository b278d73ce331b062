"""``upload_dtype``: gradients rounded to bfloat16 or float16 for the upload.

The server widens them to the session's dtype, so a step equals torch's step on
``grad.to(dtype).to(float32)``: checked against the golden file (always) and against
torch itself where it is installed.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
from optserve_client import AsyncClient, Client
from optserve_client.safetensors import to_bfloat16

from tests.clients import upload_dtype_parity as parity

GOLDEN = np.load(parity.FIXTURE)


FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
"""The float32 tolerance of every parity test (tests/core): numpy's arithmetic may round
an update differently from torch's in the last bits."""


def _params(url: str, optimizer: str, dtype: str | None) -> np.ndarray:
    """The parameters after each step of a session that holds them."""
    with Client(url, upload_dtype=dtype) as client:  # type: ignore[arg-type]
        config = parity.OPTIMIZERS[optimizer]
        session = client.create_session(config, {"w": parity.initial()})
        after = []
        for grad in parity.gradients():
            session.step(grad, returns="none")
            after.append(session.params()["w"])
        session.delete()
    return np.stack(after)


@pytest.mark.parametrize("optimizer", parity.OPTIMIZERS)
@pytest.mark.parametrize("dtype", parity.DTYPES)
def test_step_equals_the_golden_torch_step_on_rounded_gradients(
    live_url: str, optimizer: str, dtype: str
) -> None:
    got = _params(live_url, optimizer, dtype)
    np.testing.assert_allclose(got, GOLDEN[f"{optimizer}_{dtype}"], **FLOAT32)


@pytest.mark.parametrize("optimizer", parity.OPTIMIZERS)
@pytest.mark.parametrize("dtype", parity.DTYPES)
def test_step_equals_live_torch_on_rounded_gradients(
    live_url: str, optimizer: str, dtype: str
) -> None:
    pytest.importorskip("torch")
    got = _params(live_url, optimizer, dtype)
    np.testing.assert_allclose(got, parity.torch_params(optimizer, dtype), **FLOAT32)


@pytest.mark.parametrize("dtype", parity.DTYPES)
def test_rounding_changes_the_step_beyond_the_tolerance(live_url: str, dtype: str) -> None:
    """An upload that skipped the rounding would fail the tests above."""
    exact = _params(live_url, "sgd", None)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(exact, GOLDEN[f"sgd_{dtype}"], **FLOAT32)


def _same_bfloat16(got: np.ndarray, want: np.ndarray, values: np.ndarray) -> None:
    """Bit for bit, except that any NaN is as good as another (torch's own NaN bits
    differ between its scalar and vector paths)."""
    nan = np.isnan(values)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    widened = (got[nan].astype(np.uint32) << 16).view(np.float32)
    assert np.isnan(widened).all()


def test_bfloat16_rounding_matches_torch_bit_for_bit() -> None:
    values = parity.probe_values()
    assert np.isnan(values).any()
    _same_bfloat16(to_bfloat16(values), GOLDEN["bfloat16_bits"], values)
    pytest.importorskip("torch")
    _same_bfloat16(to_bfloat16(values), parity.torch_bfloat16_bits(values), values)


def _captured_step(dtype: str | None) -> tuple[dict[str, Any], int]:
    """The safetensors header and body size of a step sent with ``upload_dtype``."""
    seen: list[httpx.Request] = []
    document = {"id": "s", "tensors": {"w": {"shape": [4]}}, "dtype": "float32", "step": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=document)
        seen.append(request)
        return httpx.Response(200, json={"step": 1, "lr": [0.1], "applied": True})

    with Client("http://test", transport=httpx.MockTransport(handler), upload_dtype=dtype) as c:  # type: ignore[arg-type]
        c.session("s").step(np.array([1.0, 2.0, 3.0, 4.0], np.float32), returns="none")
    body = seen[0].read()
    assert int(seen[0].headers["content-length"]) == len(body)
    (length,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + length]), len(body) - 8 - length


@pytest.mark.parametrize(
    ("dtype", "label", "size"), [("bfloat16", "BF16", 8), ("float16", "F16", 8), (None, "F32", 16)]
)
def test_the_wire_dtype_is_the_upload_dtype(dtype: str | None, label: str, size: int) -> None:
    header, data_bytes = _captured_step(dtype)
    assert header["w"]["dtype"] == label
    assert data_bytes == size


def test_json_wire_refuses_upload_dtype() -> None:
    with pytest.raises(ValueError, match="safetensors"):
        Client("http://test", wire="json", upload_dtype="bfloat16")
    with pytest.raises(ValueError, match="safetensors"):
        AsyncClient("http://test", wire="json", upload_dtype="float16")


def test_unknown_upload_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="upload_dtype"):
        Client("http://test", upload_dtype="int8")  # type: ignore[arg-type]

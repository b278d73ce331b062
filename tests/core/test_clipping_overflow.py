"""Norms that pass the dtype's range are inf, as torch's are (it sums in the tensor's dtype).

Core sums in float64 in a fixed order (replays across machines); a float32 norm whose sum
of squares passes float32's largest value is still inf, as torch's ``get_total_norm`` is.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.core.clipping import total_norm

torch = pytest.importorskip("torch")

VALUES = [[1e30, 1e30], [3e19, 4e19], [1e19, 1e19], [3.0, 4.0], [1e38, 1e38]]


@pytest.mark.parametrize("values", VALUES, ids=[str(v[0]) for v in VALUES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
def test_norms_overflow_where_torch_overflows(
    values: list[float], dtype: type, norm_type: float
) -> None:
    grads = [np.array(values, dtype=dtype), np.array(values[:1], dtype=dtype)]
    expected = float(
        torch.nn.utils.get_total_norm([torch.from_numpy(g) for g in grads], norm_type=norm_type)
    )
    got = float(total_norm(grads, norm_type))
    if np.isinf(expected):
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-6)

"""CAME (package came-pytorch, ``came_pytorch.CAME``): confidence-guided Adafactor.

Luo et al. (2023), "CAME: Confidence-guided Adaptive Memory Efficient Optimization".
Like Adafactor, a tensor of two or more dimensions keeps its second moment as row and
column factors of its last two dimensions; CAME adds a momentum of the clipped update
and factors of its instability (the squared distance of the update from that momentum),
which scale the momentum's step. Tensors of fewer dimensions keep a full second moment
and step by the momentum alone. State is per tensor, so partial steps skip tensors as the
package does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import reductions
from service.core.hparams import Arg, check
from service.core.optimizers.base import Optimizer, Shape, register
from service.core.optimizers.restored import mismatch as restored_mismatch

_FACTORED_FIELDS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_res_row", "exp_avg_res_col")


@dataclass
class CAMEState:
    step: int = 0
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq_row: list[np.ndarray] = field(default_factory=list)
    """Row factors of the second moment, shape ``shape[:-1]``, one per tensor of two or
    more dimensions, in the group's tensor order."""
    exp_avg_sq_col: list[np.ndarray] = field(default_factory=list)
    """Column factors, shape ``shape[:-2] + shape[-1:]``, aligned with the rows."""
    exp_avg_res_row: list[np.ndarray] = field(default_factory=list)
    """Row factors of the instability, aligned with the second moment's."""
    exp_avg_res_col: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    """Full second moments of the 0-D and 1-D tensors, in the group's tensor order."""


def _factored(shape: Shape) -> bool:
    return len(shape) >= 2


def _rms(a: np.ndarray) -> np.floating[Any]:
    """``a.norm(2) / a.numel() ** 0.5`` as the package computes it: a dtype scalar."""
    dtype = a.dtype.type
    rms: np.floating[Any] = dtype(reductions.norm2(a)) / dtype(math.sqrt(a.size))
    return rms


def _decay_add_(avg: np.ndarray, x: np.ndarray, beta: float) -> None:
    """``avg.mul_(beta).add_(x, alpha=1 - beta)``."""
    dtype = avg.dtype.type
    avg *= dtype(beta)
    avg += x * dtype(1.0 - beta)


def _mean(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    """torch's ``mean(dim)`` on CPU: the sum, divided by the count."""
    total: np.ndarray = a.sum(axis=axis, keepdims=keepdims)
    total /= a.dtype.type(a.shape[axis])
    return total


def _approx(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The package's ``_approx_sq_grad``: rsqrt(row / mean(row)) outer rsqrt(col)."""
    r_factor = row / _mean(row, -1, keepdims=True)
    r_factor = 1 / np.sqrt(r_factor)
    c_factor = 1 / np.sqrt(col)
    product: np.ndarray = r_factor[..., :, None] * c_factor[..., None, :]
    return product


class CAME(Optimizer[CAMEState]):
    r"""came-pytorch's ``step``, in its op order, per tensor.

    .. math::
        u &\leftarrow g / \sqrt{\hat V}, \quad \hat V \text{ from } g^2 + \epsilon_1
            \text{ (factored for 2-D and up)} \\
        u &\leftarrow u / \max(1, \operatorname{RMS}(u) / d), \quad
        m \leftarrow \beta_1 m + (1 - \beta_1) u \\
        \theta &\leftarrow \theta (1 - \gamma \lambda)
            - \gamma\, m / \sqrt{\hat S}, \quad
        \hat S \text{ from } (u - m)^2 + \epsilon_2 \text{ (2-D and up; else } \hat S = 1)

    with :math:`\hat V, \hat S` kept as moving averages with :math:`\beta_2, \beta_3`.
    """

    name = "CAME"
    args = (
        Arg("lr", "float", None, "learning rate (the package has no default)", required=True),
        Arg(
            "eps",
            "float_pair",
            (1e-30, 1e-16),
            "regularization of the squared gradient and of the instability",
        ),
        Arg("clip_threshold", "float", 1.0, "threshold of the update's root mean square"),
        Arg(
            "betas",
            "float_list",
            (0.9, 0.999, 0.9999),
            "decay rates of the update's momentum, the squared gradient and the instability",
        ),
        Arg("weight_decay", "float", 0.0, "decoupled weight decay coefficient"),
    )
    reference = "came-pytorch"
    unsupported = ()
    state_type = CAMEState

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        # came-pytorch asserts these (``assert lr > 0.``), with no message of its own.
        lr, betas = hp["lr"], hp["betas"]
        check(lr > 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(
            len(betas) == 3,
            f"{where}betas",
            f"betas must have three entries, got {len(betas)}",
            list(betas),
        )
        for i, beta in enumerate(betas):
            check(
                0.0 <= beta <= 1.0,
                f"{where}betas",
                f"Invalid beta parameter at index {i}: {beta}",
                list(betas),
            )

        # The package checks none of these. A negative eps can make the squared gradient's
        # average negative and its root NaN; a clip_threshold of 0 divides by zero and a
        # negative one turns clipping off.
        eps = hp["eps"]
        check(min(eps) >= 0.0, f"{where}eps", f"Invalid epsilon value: {list(eps)}", list(eps))
        clip, wd = hp["clip_threshold"], hp["weight_decay"]
        check(clip > 0.0, f"{where}clip_threshold", f"Invalid clip_threshold value: {clip}", clip)
        check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        return bool(hp["weight_decay"])

    def check_restored(self, restored: CAMEState, fresh: CAMEState) -> str:
        why = restored_mismatch(restored, fresh, ("step",))
        return why or (f"step {restored.step} is negative" if restored.step < 0 else "")

    def list_members(self, field: str, shapes: Sequence[Shape]) -> list[int]:
        factored = [i for i, shape in enumerate(shapes) if _factored(shape)]
        if field in _FACTORED_FIELDS:
            return factored
        if field == "exp_avg_sq":
            return [i for i in range(len(shapes)) if i not in factored]
        return list(range(len(shapes)))

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> CAMEState:
        state = CAMEState(exp_avg=[np.zeros(s, dtype=dtype) for s in shapes])
        for shape in shapes:
            if _factored(shape):
                row, col = shape[:-1], (*shape[:-2], shape[-1])
                state.exp_avg_sq_row.append(np.zeros(row, dtype=dtype))
                state.exp_avg_sq_col.append(np.zeros(col, dtype=dtype))
                state.exp_avg_res_row.append(np.zeros(row, dtype=dtype))
                state.exp_avg_res_col.append(np.zeros(col, dtype=dtype))
            else:
                state.exp_avg_sq.append(np.zeros(shape, dtype=dtype))
        return state

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: CAMEState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> CAMEState:
        lr, wd, clip = hp["lr"], hp["weight_decay"], hp["clip_threshold"]
        (eps1, eps2), (beta1, beta2, beta3) = hp["eps"], hp["betas"]
        factored = iter(
            zip(
                state.exp_avg_sq_row,
                state.exp_avg_sq_col,
                state.exp_avg_res_row,
                state.exp_avg_res_col,
                strict=True,
            )
        )
        full = iter(state.exp_avg_sq)
        for i, (g, d) in enumerate(zip(grads, out, strict=True)):
            dtype = g.dtype.type
            m = state.exp_avg[i]
            squared = g * g
            squared += dtype(eps1)
            if _factored(g.shape):
                sq_row, sq_col, res_row, res_col = next(factored)
                _decay_add_(sq_row, _mean(squared, -1), beta2)
                _decay_add_(sq_col, _mean(squared, -2), beta2)
                update = _approx(sq_row, sq_col)
            else:
                v = next(full)
                _decay_add_(v, squared, beta2)
                update = 1 / np.sqrt(v)
            update *= g
            update /= max(_rms(update) / dtype(clip), dtype(1.0))
            _decay_add_(m, update, beta1)
            if _factored(g.shape):
                # The instability: how far the update strays from its momentum.
                res = update - m
                res *= res
                res += dtype(eps2)
                _decay_add_(res_row, _mean(res, -1), beta3)
                _decay_add_(res_col, _mean(res, -2), beta3)
                step = _approx(res_row, res_col)
                step *= m
            else:
                step = m.copy()
            # p += p (-wd lr); p += -(step lr). (p + p c) - p is exact, so the delta carries
            # the package's rounded decay.
            step *= dtype(lr)
            np.negative(step, out=d)
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
                decayed = p + p * dtype(-wd * lr)
                decayed -= p
                d += decayed
        state.step += 1
        return state


register(CAME())

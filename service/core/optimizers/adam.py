"""Adam and AdamW (torch.optim.Adam, torch.optim.AdamW): one rule, one kernel.

In torch 2.13 AdamW is Adam with ``decoupled_weight_decay=True`` and a default
``weight_decay`` of 1e-2; it does not take ``decoupled_weight_decay`` as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import native
from service.core.hparams import Arg
from service.core.kernels import (
    Kernel,
    Lerp,
    constants,
    decay_add_square_,
    elementwise,
    signed_grad,
)
from service.core.optimizers.adam_args import adam_args, validate_adam_args
from service.core.optimizers.base import Optimizer, Shape, register

_FLOAT32 = np.dtype(np.float32)


@dataclass
class AdamState:
    step: int = 0
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    max_exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    """Running maximum of ``exp_avg_sq``; kept only with ``amsgrad``."""


def _betas_args(default_lr: float, default_wd: float) -> tuple[Arg, ...]:
    return (
        *adam_args(default_lr, default_wd),
        Arg("amsgrad", "bool", False, "use the running maximum of the second moment"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )


class Adam(Optimizer[AdamState]):
    r"""Adam, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t \;(+\, \lambda \theta_{t-1} \text{ unless decoupled}) \\
        \theta_{t-1} &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \text{ (decoupled)} \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \hat v_t &\leftarrow \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t \\
        \theta_t &\leftarrow \theta_{t-1}
            - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t}
            + \epsilon}

    ``eps`` is added outside the square root, after the bias correction of ``v``. The
    kernel multiplies numerator and denominator by :math:`\sqrt{1 - \beta_2^t}` to save a
    pass; otherwise it follows torch's single-tensor op order (``lerp_``, ``mul_``,
    ``addcmul_``, ``addcdiv_``), so the two round alike.
    """

    name = "Adam"
    args = (
        *_betas_args(1e-3, 0.0),
        Arg("decoupled_weight_decay", "bool", False, "AdamW-style decay of the parameters"),
    )
    state_type = AdamState

    def decoupled(self, hp: Mapping[str, Any]) -> bool:
        return bool(hp["decoupled_weight_decay"])

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        validate_adam_args(hp, where)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> AdamState:
        return AdamState(
            step=0,
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes],
            max_exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes] if hp["amsgrad"] else [],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: AdamState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> AdamState:
        lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        amsgrad, maximize = hp["amsgrad"], hp["maximize"]
        decoupled = self.decoupled(hp)
        if amsgrad and not state.max_exp_avg_sq:
            state.max_exp_avg_sq = [np.zeros_like(g) for g in grads]

        step = state.step + 1
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / (1 - beta1**step)
        # torch: denom = sqrt(v) / bc2_sqrt + eps; p += (-step_size m) / denom. Scaling
        # numerator and denominator by bc2_sqrt gives the same quotient in one pass fewer:
        # denom' = sqrt(v) + eps bc2_sqrt; p += (-step_size bc2_sqrt m) / denom'.
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        lerp = Lerp.of(1 - beta1, dtype)
        beta2_, w2, eps_, neg_step, wd_, decay_factor = constants(
            dtype,
            beta2,
            1 - beta2,
            eps * bias_correction2_sqrt,
            -step_size * bias_correction2_sqrt,
            wd,
            1 - lr * wd,
        )

        def kernel(
            g: np.ndarray,
            p: np.ndarray | None,
            m: np.ndarray,
            v: np.ndarray,
            v_max: np.ndarray | None,
            d: np.ndarray,
            s: np.ndarray,
            t: np.ndarray,
        ) -> None:
            g, sign = signed_grad(g, None if decoupled else p, wd_, maximize, t)
            lerp.apply_(m, g, sign, s)
            decay_add_square_(v, g, beta2_, w2, s)
            if v_max is not None:
                np.maximum(v_max, v, out=v_max)
                v = v_max
            np.sqrt(v, out=s)
            np.add(s, eps_, out=s)
            np.multiply(m, neg_step, out=d)
            np.divide(d, s, out=d)
            if decoupled and p is not None:
                # torch rounds p (1 - lr wd) to the dtype before adding the Adam step, and
                # that rounding drifts the same way step after step; (p c - p) is exact, so
                # the delta carries torch's rounded decay rather than the ideal one.
                np.multiply(p, decay_factor, out=s)
                np.subtract(s, p, out=s)
                np.add(d, s, out=d)

        fused = (
            None
            if amsgrad
            else _native_kernel(
                lerp, maximize, (w2, beta2_, eps_, neg_step, wd_, decay_factor), wd, decoupled
            )
        )
        # ufunc calls per block: lerp 3, second moment 4, denominator 2, delta 2.
        passes = 11 + (3 if wd != 0 else 0) + (1 if amsgrad else 0)
        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            arrays = [
                g,
                p,
                state.exp_avg[i],
                state.exp_avg_sq[i],
                state.max_exp_avg_sq[i] if amsgrad else None,
                out[i],
            ]
            # Without amsgrad, a float32 tensor's update runs natively where it can.
            float32 = all(a is None or a.dtype == _FLOAT32 for a in arrays)
            chosen: Kernel = fused if fused is not None and float32 else kernel
            elementwise(chosen, arrays, n_scratch=2, passes=passes)
        state.step = step
        return state


def _native_kernel(
    lerp: Lerp,
    maximize: bool,
    values: tuple[np.ndarray, ...],
    wd: float,
    decoupled: bool,
) -> Kernel | None:
    """The numpy kernel's operations in one native loop (service/core/native.py), the same
    bits, for float32 tensors; None where the native kernels are not in use. ``values``:
    the kernel's 0-d constants, in ``_native.adam``'s order (w2, beta2, eps, neg_step, wd,
    decay_factor)."""
    compiled = native.kernels
    if compiled is None:
        return None
    if wd == 0:
        mode = native.DECAY_NONE
    else:
        mode = native.DECAY_DECOUPLED if decoupled else native.DECAY_COUPLED
    scalars = (
        float(lerp.weight),
        float(lerp.complement),
        lerp.small,
        maximize,
        *(float(x) for x in values),
        mode,
    )

    def kernel(*views: np.ndarray | None) -> None:
        # The numpy kernel's views (g, p, m, v, v_max, d, scratch...): without amsgrad,
        # v_max is None, and the native loop needs no scratch.
        g, p, m, v, _, d = views[:6]
        compiled.adam(g, p, m, v, d, *scalars)

    return kernel


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay, default ``weight_decay=1e-2``."""

    name = "AdamW"
    args = _betas_args(1e-3, 1e-2)

    def decoupled(self, hp: Mapping[str, Any]) -> bool:
        return True


register(Adam())
register(AdamW())

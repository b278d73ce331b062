"""RAdam (torch.optim.RAdam): Adam with a rectified adaptive learning rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg
from service.core.kernels import elementwise
from service.core.optimizers.adam_args import (
    Moments,
    adam_args,
    moment_arrays,
    validate_adam_args,
)
from service.core.optimizers.base import Optimizer, Shape, register

RHO_THRESHOLD = 5.0
"""torch rectifies the adaptive step only once the SMA length exceeds this."""


@dataclass
class RAdamState:
    step: int = 0
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)


def rectification(beta2: float, step: float) -> float | None:
    """torch's variance rectification term at ``step``, or ``None`` while rho_t <= 5.

    With ``None`` the step is plain bias-corrected momentum, without the adaptive term.
    """
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / (1 - beta2**step)
    if not rho_t > RHO_THRESHOLD:
        return None
    ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
    return float(ratio**0.5)


class RAdam(Optimizer[RAdamState]):
    r"""RAdam, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t \;(+\, \lambda \theta_{t-1} \text{ unless decoupled}) \\
        \theta_{t-1} &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \text{ (decoupled)} \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \rho_\infty &\leftarrow 2 / (1 - \beta_2) - 1, \quad
        \rho_t \leftarrow \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t) \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma \frac{m_t}{1 - \beta_1^t} \cdot
            \begin{cases}
                r_t \sqrt{1 - \beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\
                1 & \text{otherwise}
            \end{cases} \\
        r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
            {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}
    """

    name = "RAdam"
    args = (
        *adam_args(lr=1e-3),
        Arg("decoupled_weight_decay", "bool", False, "AdamW-style decay of the parameters"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = RAdamState
    unsupported = ("foreach", "capturable", "differentiable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        validate_adam_args(hp, where)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> RAdamState:
        return RAdamState(
            step=0,
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: RAdamState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> RAdamState:
        lr, eps, wd = hp["lr"], hp["eps"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        sign = -1.0 if hp["maximize"] else 1.0
        decoupled_wd = wd != 0 and hp["decoupled_weight_decay"]
        coupled_wd = wd != 0 and not decoupled_wd
        needs_p = wd != 0
        decay = 1 - lr * wd

        step = float(state.step + 1)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rect = rectification(beta2, step)
        moments = Moments(sign, wd if coupled_wd else None, beta1, beta2)

        def kernel(*views: np.ndarray) -> None:
            g, m, v, d, s, t = views[0], *views[-5:]
            moments.update_(g, views[1] if needs_p else None, m, v, s, t)
            # t <- m / bc1 * lr (* sqrt(bc2) / (sqrt(v) + eps) * rect), torch's product order.
            np.divide(m, bias_correction1, out=t)
            t *= lr
            if rect is not None:
                np.sqrt(v, out=s)
                s += eps
                np.divide(bias_correction2**0.5, s, out=s)
                t *= s
                t *= rect
            # d <- the parameter after decay and add_(t, alpha=-1); d - p is the delta.
            if needs_p:
                p = views[1]
                if decoupled_wd:
                    np.multiply(p, decay, out=d)
                else:
                    d[...] = p
                d -= t
                d -= p
            else:
                np.negative(t, out=d)

        for arrays in moment_arrays(grads, params, state.exp_avg, state.exp_avg_sq, out, needs_p):
            elementwise(kernel, arrays, n_scratch=2)
        state.step += 1
        return state


register(RAdam())

"""Adamax, Adam with the infinity norm (torch.optim.Adamax)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg
from service.core.kernels import Lerp, constants, elementwise, signed_grad
from service.core.optimizers.adam_args import validate_adam_args
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class AdamaxState:
    step: int = 0
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_inf: list[np.ndarray] = field(default_factory=list)


class Adamax(Optimizer[AdamaxState]):
    r"""Adamax, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        u_t &\leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        \theta_t &\leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t} \frac{m_t}{u_t}
    """

    name = "Adamax"
    args = (
        Arg("lr", "float", 2e-3, "learning rate"),
        Arg("betas", "float_pair", (0.9, 0.999), "decay rates of the moment and the norm"),
        Arg("eps", "float", 1e-8, "added to |g| for numerical stability"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = AdamaxState
    unsupported = ("foreach", "differentiable", "capturable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        validate_adam_args(hp, where)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> AdamaxState:
        return AdamaxState(
            step=0,
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            exp_inf=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: AdamaxState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> AdamaxState:
        eps, wd, maximize = hp["eps"], hp["weight_decay"], hp["maximize"]
        beta1, beta2 = hp["betas"]
        step = state.step + 1
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        lerp = Lerp.of(1 - beta1, dtype)
        neg_clr, beta2_, eps_, wd_ = constants(
            dtype, -(hp["lr"] / (1 - beta1**step)), beta2, eps, wd
        )

        def kernel(
            g: np.ndarray,
            p: np.ndarray | None,
            exp_avg: np.ndarray,
            exp_inf: np.ndarray,
            d: np.ndarray,
            s: np.ndarray,
            t: np.ndarray,
        ) -> None:
            g, sign = signed_grad(g, p, wd_, maximize, t)
            lerp.apply_(exp_avg, g, sign, s)
            # torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps), out=exp_inf)
            np.multiply(exp_inf, beta2_, out=exp_inf)
            np.abs(g, out=s)
            np.add(s, eps_, out=s)
            np.maximum(exp_inf, s, out=exp_inf)
            # param.addcdiv_(exp_avg, exp_inf, value=-clr)
            np.multiply(exp_avg, neg_clr, out=d)
            np.divide(d, exp_inf, out=d)

        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            arrays = [g, p, state.exp_avg[i], state.exp_inf[i], out[i]]
            elementwise(kernel, arrays, n_scratch=2, passes=9)
        state.step = step
        return state


register(Adamax())

"""Adadelta (torch.optim.Adadelta)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check, check_non_negative
from service.core.kernels import constants, decay_add_square_, elementwise, signed_grad
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class AdadeltaState:
    step: int = 0
    square_avg: list[np.ndarray] = field(default_factory=list)
    acc_delta: list[np.ndarray] = field(default_factory=list)


class Adadelta(Optimizer[AdadeltaState]):
    r"""Adadelta, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        v_t &\leftarrow \rho v_{t-1} + (1 - \rho) g_t^2 \\
        \Delta x_t &\leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t \\
        u_t &\leftarrow \rho u_{t-1} + (1 - \rho) \Delta x_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma \Delta x_t
    """

    name = "Adadelta"
    args = (
        Arg("lr", "float", 1.0, "coefficient that scales the delta"),
        Arg("rho", "float", 0.9, "decay rate of the running averages"),
        Arg("eps", "float", 1e-6, "added inside the square roots for numerical stability"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = AdadeltaState
    unsupported = ("foreach", "capturable", "differentiable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        rho = hp["rho"]
        check_non_negative(hp, ("lr",), where)
        check(0.0 <= rho <= 1.0, f"{where}rho", f"Invalid rho value: {rho}", rho)
        check_non_negative(hp, ("eps", "weight_decay"), where)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> AdadeltaState:
        return AdadeltaState(
            step=0,
            square_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            acc_delta=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: AdadeltaState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> AdadeltaState:
        lr, rho, eps = hp["lr"], hp["rho"], hp["eps"]
        wd, maximize = hp["weight_decay"], hp["maximize"]
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        rho_, w_rho, eps_, neg_lr, pos_lr, wd_ = constants(dtype, rho, 1 - rho, eps, -lr, lr, wd)

        def kernel(
            g: np.ndarray,
            p: np.ndarray | None,
            square_avg: np.ndarray,
            acc_delta: np.ndarray,
            d: np.ndarray,
            s: np.ndarray,
            t: np.ndarray,
            delta: np.ndarray,
        ) -> None:
            g, sign = signed_grad(g, p, wd_, maximize, t)
            decay_add_square_(square_avg, g, rho_, w_rho, s)
            # std = sqrt(square_avg + eps); delta = sqrt(acc_delta + eps) / std * g
            np.add(square_avg, eps_, out=s)
            np.sqrt(s, out=s)
            np.add(acc_delta, eps_, out=delta)
            np.sqrt(delta, out=delta)
            np.divide(delta, s, out=delta)
            np.multiply(delta, g, out=delta)
            # `delta` lacks the maximize sign, which its square does not need.
            decay_add_square_(acc_delta, delta, rho_, w_rho, s)
            # param.add_(delta, alpha=-lr), the sign folded into the scalar.
            np.multiply(delta, neg_lr if sign > 0 else pos_lr, out=d)

        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            arrays = [g, p, state.square_avg[i], state.acc_delta[i], out[i]]
            elementwise(kernel, arrays, n_scratch=3, passes=15)
        state.step += 1
        return state


register(Adadelta())

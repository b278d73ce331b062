"""SGD with momentum, dampening, Nesterov, weight decay and maximize (torch.optim.SGD)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check, check_non_negative
from service.core.kernels import elementwise, signed_grad
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class SGDState:
    step: int = 0
    momentum_buffer: list[np.ndarray] = field(default_factory=list)


class SGD(Optimizer[SGDState]):
    r"""Stochastic gradient descent, torch's update rule.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        b_t &\leftarrow g_t \text{ at } t=1, \text{ else } \mu b_{t-1} + (1-\tau) g_t \\
        g_t &\leftarrow g_t + \mu b_t \text{ (nesterov) or } b_t \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma g_t

    The buffer starts as the first (decayed) gradient itself: no dampening on step 1.
    """

    name = "SGD"
    args = (
        Arg("lr", "float", 1e-3, "learning rate"),
        Arg("momentum", "float", 0.0, "momentum factor"),
        Arg("dampening", "float", 0.0, "dampening for momentum"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("nesterov", "bool", False, "Nesterov momentum"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = SGDState
    unsupported = ("foreach", "differentiable", "fused")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        check_non_negative(hp, ("lr", "momentum", "weight_decay"), where)
        check(
            not hp["nesterov"] or (hp["momentum"] > 0 and hp["dampening"] == 0),
            f"{where}nesterov",
            "Nesterov momentum requires a momentum and zero dampening",
            hp["nesterov"],
        )

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> SGDState:
        buffers = [np.zeros(s, dtype=dtype) for s in shapes] if hp["momentum"] != 0 else []
        return SGDState(step=0, momentum_buffer=buffers)

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: SGDState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> SGDState:
        lr, momentum, dampening = hp["lr"], hp["momentum"], hp["dampening"]
        wd, nesterov = hp["weight_decay"], hp["nesterov"]
        maximize = hp["maximize"]
        first = state.step == 0
        if momentum != 0 and not state.momentum_buffer:
            # A schedule (CyclicLR) may switch momentum on after init.
            state.momentum_buffer = [np.zeros_like(g) for g in grads]

        def kernel(*views: np.ndarray) -> None:
            # Fewest passes: the maximize sign is folded into scalars where it is exact.
            d, s = views[-2], views[-1]
            g, g_sign = signed_grad(views[0], views[1] if wd != 0 else None, wd, maximize, s)
            if momentum == 0:
                np.multiply(g, -lr * g_sign, out=d)
                return
            buf = views[2] if wd != 0 else views[1]
            if first:
                np.multiply(g, g_sign, out=buf)
            else:
                buf *= momentum
                if dampening != 0:  # never with nesterov, so g may be overwritten
                    np.multiply(g, (1 - dampening) * g_sign, out=s)
                    buf += s
                elif g_sign < 0:
                    buf -= g
                else:
                    buf += g
            if nesterov:
                # param.add_(grad.add(buf, alpha=momentum), alpha=-lr)
                np.multiply(buf, momentum, out=d)
                if g_sign < 0:
                    d -= g
                else:
                    d += g
                d *= -lr
            else:
                np.multiply(buf, -lr, out=d)

        for i, g in enumerate(grads):
            arrays = [g]
            if wd != 0:
                assert params is not None
                arrays.append(params[i])
            if momentum != 0:
                arrays.append(state.momentum_buffer[i])
            arrays.append(out[i])
            elementwise(kernel, arrays, n_scratch=1, passes=3 if momentum != 0 else 1)
        state.step += 1
        return state


register(SGD())

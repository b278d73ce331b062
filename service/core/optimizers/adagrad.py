"""Adagrad with learning-rate decay and an initial accumulator (torch.optim.Adagrad)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check_non_negative
from service.core.kernels import constants, elementwise, signed_grad
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class AdagradState:
    step: int = 0
    sum: list[np.ndarray] = field(default_factory=list)
    """Sum of squared gradients, starting at ``initial_accumulator_value``."""


class Adagrad(Optimizer[AdagradState]):
    r"""Adagrad, torch's single-tensor update rule for dense gradients.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        \tilde\gamma_t &\leftarrow \gamma / (1 + (t - 1) \eta) \\
        s_t &\leftarrow s_{t-1} + g_t^2 \\
        \theta_t &\leftarrow \theta_{t-1} - \tilde\gamma_t \, g_t / (\sqrt{s_t} + \epsilon)

    ``s_0`` is ``initial_accumulator_value``; ``eps`` is added outside the square root.
    """

    name = "Adagrad"
    args = (
        Arg("lr", "float", 1e-2, "learning rate"),
        Arg("lr_decay", "float", 0.0, "learning rate decay per step"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("initial_accumulator_value", "float", 0.0, "starting value of the squared sum"),
        Arg("eps", "float", 1e-10, "added to the denominator for numerical stability"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = AdagradState
    unsupported = ("foreach", "differentiable", "fused")
    # torch's constructor fills every group's sums with its own argument, not the group's.
    constructor_state_args = ("initial_accumulator_value",)

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        names = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
        check_non_negative(hp, names, where)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> AdagradState:
        initial = hp["initial_accumulator_value"]
        return AdagradState(step=0, sum=[np.full(s, initial, dtype=dtype) for s in shapes])

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: AdagradState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> AdagradState:
        eps, wd, maximize = hp["eps"], hp["weight_decay"], hp["maximize"]
        step = state.step + 1
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        eps_, neg_clr, pos_clr, wd_ = constants(dtype, eps, -clr, clr, wd)

        def kernel(
            g: np.ndarray,
            p: np.ndarray | None,
            total: np.ndarray,
            d: np.ndarray,
            s: np.ndarray,
            t: np.ndarray,
        ) -> None:
            g, sign = signed_grad(g, p, wd_, maximize, t)
            # sum.addcmul_(g, g, value=1); the sign of g does not matter here.
            np.multiply(g, g, out=s)
            np.add(total, s, out=total)
            np.sqrt(total, out=s)
            np.add(s, eps_, out=s)
            # param.addcdiv_(g, std, value=-clr), the sign folded into the scalar.
            np.multiply(g, neg_clr if sign > 0 else pos_clr, out=d)
            np.divide(d, s, out=d)

        passes = 6 + (2 if wd != 0 else 0)  # ufunc calls per block
        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            elementwise(kernel, [g, p, state.sum[i], out[i]], n_scratch=2, passes=passes)
        state.step = step
        return state


register(Adagrad())

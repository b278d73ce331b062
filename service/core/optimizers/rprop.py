"""Rprop (torch.optim.Rprop): per-element step sizes adapted from gradient sign changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import elementwise
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class RpropState:
    step: int = 0
    prev: list[np.ndarray] = field(default_factory=list)
    """The previous step's gradient, zeroed where its sign flipped."""
    step_size: list[np.ndarray] = field(default_factory=list)
    """Per-element step sizes; set to the learning rate when the first step runs."""


class Rprop(Optimizer[RpropState]):
    r"""Resilient backpropagation, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t \\
        \eta_t &\leftarrow \begin{cases}
            \eta_+ & g_t g_{t-1} > 0 \\ \eta_- & g_t g_{t-1} < 0 \\ 1 & \text{otherwise}
        \end{cases} \\
        s_t &\leftarrow \operatorname{clamp}(\eta_t s_{t-1}, s_{min}, s_{max}) \\
        g_t &\leftarrow 0 \text{ where } g_t g_{t-1} < 0 \\
        \theta_t &\leftarrow \theta_{t-1} - \operatorname{sign}(g_t) s_t

    :math:`s_0` is the learning rate at the first step; :math:`g_{t-1}` is the stored
    gradient, zeroed where the sign flipped, so the step after a flip never shrinks again.
    """

    name = "Rprop"
    args = (
        Arg("lr", "float", 1e-2, "learning rate: the initial step size"),
        Arg("etas", "float_pair", (0.5, 1.2), "multiplicative decrease and increase factors"),
        Arg("step_sizes", "float_pair", (1e-6, 50.0), "minimal and maximal step sizes"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = RpropState
    unsupported = ("capturable", "foreach", "differentiable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, (eta_minus, eta_plus) = hp["lr"], hp["etas"]
        check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(
            0.0 < eta_minus < 1.0 < eta_plus,
            f"{where}etas",
            f"Invalid eta values: {eta_minus}, {eta_plus}",
            hp["etas"],
        )

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        return False

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> RpropState:
        return RpropState(
            step=0,
            prev=[np.zeros(s, dtype=dtype) for s in shapes],
            step_size=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: RpropState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> RpropState:
        eta_minus, eta_plus = hp["etas"]
        size_min, size_max = hp["step_sizes"]
        sign = -1.0 if hp["maximize"] else 1.0
        if state.step == 0:
            # torch fills the step sizes from the group's lr when the first step runs,
            # after any schedule has already scaled that lr.
            for size in state.step_size:
                size.fill(hp["lr"])

        def kernel(
            g: np.ndarray,
            prev: np.ndarray,
            size: np.ndarray,
            d: np.ndarray,
            product: np.ndarray,
            factor: np.ndarray,
        ) -> None:
            # d <- the effective gradient; product <- its agreement with the previous one.
            np.multiply(g, sign, out=d)
            np.multiply(d, prev, out=product)
            factor.fill(1.0)
            np.copyto(factor, eta_plus, where=product > 0)
            flipped = product < 0
            np.copyto(factor, eta_minus, where=flipped)
            size *= factor
            np.clip(size, size_min, size_max, out=size)
            # Where the sign flipped the gradient counts as zero: no step, and no
            # shrinking again next time.
            np.copyto(d, 0.0, where=flipped)
            prev[...] = d
            np.sign(d, out=d)
            d *= size
            np.negative(d, out=d)

        for g, prev, size, d in zip(grads, state.prev, state.step_size, out, strict=True):
            elementwise(kernel, [g, prev, size, d], n_scratch=2)
        state.step += 1
        return state


register(Rprop())

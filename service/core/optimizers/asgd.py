"""Averaged SGD (torch.optim.ASGD), torch's single-tensor path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import elementwise
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class ASGDState:
    step: int = 0
    eta: float = 0.0
    """Step size for the next step. torch keeps it in a float32 scalar tensor, so it is
    rounded to float32 here too, whatever the session's dtype."""
    mu: float = 1.0
    """Averaging weight for the next step, float32-rounded like ``eta``."""
    ax: list[np.ndarray] = field(default_factory=list)
    """The running average of the parameters."""


def _float32(value: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _next_eta(lr: float, lambd: float, alpha: float, step: float) -> float:
    """torch's ``lr / (1 + lambd * lr * step) ** alpha``, without Python's exceptions.

    Out-of-range settings (a negative ``lambd``) give inf or nan instead of raising.
    """
    with np.errstate(all="ignore"):
        value = np.float64(lr) / np.power(np.float64(1 + lambd * lr * step), alpha)
        return float(np.float32(value))


class ASGD(Optimizer[ASGDState]):
    r"""Averaged stochastic gradient descent, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda_{wd} \theta_{t-1} \\
        \theta_t &\leftarrow \theta_{t-1} (1 - \lambda \eta_t) - \eta_t g_t \\
        \bar\theta_t &\leftarrow \theta_t \text{ if } \mu_t = 1
            \text{ else } \bar\theta_{t-1} + \mu_t (\theta_t - \bar\theta_{t-1}) \\
        \eta_{t+1} &\leftarrow \gamma / (1 + \lambda \gamma t)^\alpha \\
        \mu_{t+1} &\leftarrow 1 / \max(1, t - t_0)

    :math:`\eta_1` is the learning rate at the first step (``lambd`` is :math:`\lambda`).
    torch keeps ``eta`` and ``mu`` as float32 scalars even for float64 parameters; they are
    rounded the same way here, which float64 parity depends on.
    """

    name = "ASGD"
    args = (
        Arg("lr", "float", 1e-2, "learning rate"),
        Arg("lambd", "float", 1e-4, "decay term"),
        Arg("alpha", "float", 0.75, "power for the eta update"),
        Arg("t0", "float", 1e6, "step at which averaging starts"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = ASGDState
    unsupported = ("foreach", "differentiable", "capturable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, wd = hp["lr"], hp["weight_decay"]
        check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        # The average tracks the parameters themselves, and the decay term reads them.
        return True

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> ASGDState:
        return ASGDState(step=0, eta=0.0, mu=1.0, ax=[np.zeros(s, dtype=dtype) for s in shapes])

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: ASGDState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> ASGDState:
        assert params is not None
        lr, lambd, alpha, t0, wd = hp["lr"], hp["lambd"], hp["alpha"], hp["t0"], hp["weight_decay"]
        sign = -1.0 if hp["maximize"] else 1.0
        if state.step == 0:
            # torch creates eta from the group's lr when the first step runs, after any
            # schedule has already scaled that lr.
            state.eta = _float32(lr)
        eta, mu = state.eta, state.mu
        decay = 1 - lambd * eta

        def kernel(
            g: np.ndarray, p: np.ndarray, ax: np.ndarray, d: np.ndarray, s: np.ndarray
        ) -> None:
            np.multiply(g, sign, out=s)
            if wd != 0:
                np.multiply(p, wd, out=d)
                s += d
            # d <- the new parameter, then the delta once the average has read it.
            np.multiply(p, decay, out=d)
            s *= -eta
            d += s
            if mu != 1:
                np.subtract(d, ax, out=s)
                s *= mu
                ax += s
            else:
                ax[...] = d
            d -= p

        for g, p, ax, d in zip(grads, params, state.ax, out, strict=True):
            elementwise(kernel, [g, p, ax, d], n_scratch=1)
        state.step += 1
        step = float(state.step)
        state.eta = _next_eta(lr, lambd, alpha, step)
        state.mu = _float32(1 / max(1, step - t0))
        return state


register(ASGD())

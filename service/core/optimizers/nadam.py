"""NAdam (torch.optim.NAdam): Adam with Nesterov momentum and a momentum-decay schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import elementwise
from service.core.optimizers.adam_args import (
    Moments,
    adam_args,
    moment_arrays,
    validate_adam_args,
)
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class NAdamState:
    step: int = 0
    mu_product: float = 1.0
    """Product of the momentum coefficients so far. torch keeps it in a float32 scalar
    tensor, so every multiplication is rounded to float32, whatever the session's dtype."""
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)


class NAdam(Optimizer[NAdamState]):
    r"""NAdam, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t \;(+\, \lambda \theta_{t-1} \text{ unless decoupled}) \\
        \theta_{t-1} &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \text{ (decoupled)} \\
        \mu_t &\leftarrow \beta_1 (1 - \tfrac12 \, 0.96^{t \psi}), \quad
            \mu_{t+1} \leftarrow \beta_1 (1 - \tfrac12 \, 0.96^{(t+1) \psi}) \\
        \Pi_t &\leftarrow \Pi_{t-1} \mu_t \\
        m_t &\leftarrow m_{t-1} + (1 - \beta_1)(g_t - m_{t-1}) \\
        v_t &\leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        d_t &\leftarrow \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
        \theta_t &\leftarrow \theta_{t-1}
            - \gamma \frac{1 - \mu_t}{1 - \Pi_t} \frac{g_t}{d_t}
            - \gamma \frac{\mu_{t+1}}{1 - \Pi_t \mu_{t+1}} \frac{m_t}{d_t}

    :math:`\psi` is ``momentum_decay`` and :math:`\Pi_t` is ``mu_product``, rounded to
    float32 after every multiplication as torch's float32 state tensor is.
    """

    name = "NAdam"
    args = (
        *adam_args(lr=2e-3),
        Arg("momentum_decay", "float", 4e-3, "momentum decay"),
        Arg("decoupled_weight_decay", "bool", False, "AdamW-style decay of the parameters"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = NAdamState
    unsupported = ("foreach", "capturable", "differentiable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        validate_adam_args(hp, where)
        psi = hp["momentum_decay"]
        check(psi >= 0.0, f"{where}momentum_decay", f"Invalid momentum_decay value: {psi}", psi)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> NAdamState:
        return NAdamState(
            step=0,
            mu_product=1.0,
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: NAdamState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> NAdamState:
        lr, eps, wd, psi = hp["lr"], hp["eps"], hp["weight_decay"], hp["momentum_decay"]
        beta1, beta2 = hp["betas"]
        sign = -1.0 if hp["maximize"] else 1.0
        decoupled = hp["decoupled_weight_decay"]
        coupled_wd = wd != 0 and not decoupled
        decoupled_wd = wd != 0 and decoupled

        step = float(state.step + 1)
        bias_correction2 = 1 - beta2**step
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        mu_product = float(np.float32(state.mu_product) * np.float32(mu))
        # Python floats as torch computes them; numpy's division so that a degenerate
        # setting (mu rounding to 1) gives inf instead of raising.
        with np.errstate(divide="ignore", invalid="ignore"):
            grad_coef = float(np.float64(-lr * (1.0 - mu)) / np.float64(1.0 - mu_product))
            avg_coef = float(np.float64(-lr * mu_next) / np.float64(1.0 - mu_product * mu_next))
        decay = 1 - lr * wd
        needs_p = wd != 0

        moments = Moments(sign, wd if coupled_wd else None, beta1, beta2)

        def kernel(*views: np.ndarray) -> None:
            g, m, v, d, s, t = views[0], *views[-5:]
            moments.update_(g, views[1] if needs_p else None, m, v, s, t)
            # s <- the denominator sqrt(v / bc2) + eps.
            np.divide(v, bias_correction2, out=s)
            np.sqrt(s, out=s)
            s += eps
            # d <- the parameter after torch's two addcdiv_ calls (coef * t / s, then
            # coef * m / s), starting from the decayed parameter; then d - p is the delta.
            # Without parameter values (no weight decay) d sums the two terms instead.
            if needs_p:
                p = views[1]
                if decoupled_wd:
                    np.multiply(p, decay, out=d)
                else:
                    d[...] = p
                t *= grad_coef
                t /= s
                d += t
            else:
                np.multiply(t, grad_coef, out=d)
                d /= s
            np.multiply(m, avg_coef, out=t)
            t /= s
            d += t
            if needs_p:
                d -= p

        for arrays in moment_arrays(grads, params, state.exp_avg, state.exp_avg_sq, out, needs_p):
            elementwise(kernel, arrays, n_scratch=2)
        state.step += 1
        state.mu_product = mu_product
        return state


register(NAdam())

"""RMSprop with centering and momentum (torch.optim.RMSprop)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import Lerp, constants, decay_add_square_, elementwise, signed_grad
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class RMSpropState:
    step: int = 0
    square_avg: list[np.ndarray] = field(default_factory=list)
    momentum_buffer: list[np.ndarray] = field(default_factory=list)
    """Kept only with ``momentum > 0``."""
    grad_avg: list[np.ndarray] = field(default_factory=list)
    """Kept only with ``centered``."""


class RMSprop(Optimizer[RMSpropState]):
    r"""RMSprop, torch's single-tensor update rule.

    .. math::
        g_t &\leftarrow \pm g_t + \lambda \theta_{t-1} \\
        v_t &\leftarrow \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
        \bar g_t &\leftarrow \bar g_{t-1} + (1 - \alpha)(g_t - \bar g_{t-1})
            \text{ (centered)} \\
        a_t &\leftarrow \sqrt{v_t - \bar g_t^2} + \epsilon \text{ (centered) else }
            \sqrt{v_t} + \epsilon \\
        b_t &\leftarrow \mu b_{t-1} + g_t / a_t, \quad
            \theta_t \leftarrow \theta_{t-1} - \gamma b_t \text{ (momentum)} \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma g_t / a_t \text{ (otherwise)}

    ``eps`` is added outside the square root.
    """

    name = "RMSprop"
    args = (
        Arg("lr", "float", 1e-2, "learning rate"),
        Arg("alpha", "float", 0.99, "smoothing constant of the squared average"),
        Arg("eps", "float", 1e-8, "added to the denominator for numerical stability"),
        Arg("weight_decay", "float", 0.0, "L2 penalty"),
        Arg("momentum", "float", 0.0, "momentum factor"),
        Arg("centered", "bool", False, "normalize by the estimated variance of the gradient"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = RMSpropState
    unsupported = ("capturable", "foreach", "differentiable")

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, eps, momentum = hp["lr"], hp["eps"], hp["momentum"]
        wd, alpha = hp["weight_decay"], hp["alpha"]
        check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(eps >= 0.0, f"{where}eps", f"Invalid epsilon value: {eps}", eps)
        check(momentum >= 0.0, f"{where}momentum", f"Invalid momentum value: {momentum}", momentum)
        check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)
        check(alpha >= 0.0, f"{where}alpha", f"Invalid alpha value: {alpha}", alpha)

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> RMSpropState:
        def zeros() -> list[np.ndarray]:
            return [np.zeros(s, dtype=dtype) for s in shapes]

        return RMSpropState(
            step=0,
            square_avg=zeros(),
            momentum_buffer=zeros() if hp["momentum"] > 0 else [],
            grad_avg=zeros() if hp["centered"] else [],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: RMSpropState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> RMSpropState:
        lr, alpha, eps = hp["lr"], hp["alpha"], hp["eps"]
        wd, momentum, centered, maximize = (
            hp["weight_decay"],
            hp["momentum"],
            hp["centered"],
            hp["maximize"],
        )
        # A cyclic schedule may raise momentum above 0 after init; start its buffer at 0.
        if momentum > 0 and not state.momentum_buffer:
            state.momentum_buffer = [np.zeros_like(g) for g in grads]
        if centered and not state.grad_avg:
            state.grad_avg = [np.zeros_like(g) for g in grads]
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        lerp = Lerp.of(1 - alpha, dtype)
        alpha_, w_alpha, eps_, neg_lr, pos_lr, momentum_, wd_ = constants(
            dtype, alpha, 1 - alpha, eps, -lr, lr, momentum, wd
        )

        def kernel(
            g: np.ndarray,
            p: np.ndarray | None,
            square_avg: np.ndarray,
            grad_avg: np.ndarray | None,
            buf: np.ndarray | None,
            d: np.ndarray,
            *scratch: np.ndarray,
        ) -> None:
            # The output block doubles as the scratch buffer until the delta is written:
            # one array less per block keeps the working set in L2 (about 10% at 1M).
            g, sign = signed_grad(g, p, wd_, maximize, scratch[0] if scratch else d)
            decay_add_square_(square_avg, g, alpha_, w_alpha, d)
            if grad_avg is not None:
                lerp.apply_(grad_avg, g, sign, d)
                # square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
                np.multiply(grad_avg, grad_avg, out=d)
                np.subtract(square_avg, d, out=d)
                np.sqrt(d, out=d)
            else:
                np.sqrt(square_avg, out=d)
            np.add(d, eps_, out=d)
            np.divide(g, d, out=d)
            if buf is not None:
                # buf.mul_(momentum).addcdiv_(g, avg); param.add_(buf, alpha=-lr)
                np.multiply(buf, momentum_, out=buf)
                if sign < 0:
                    np.subtract(buf, d, out=buf)
                else:
                    np.add(buf, d, out=buf)
                np.multiply(buf, neg_lr, out=d)
            else:
                # param.addcdiv_(g, avg, value=-lr) as (g / avg) * -lr: one rounding
                # apart from torch's (-lr * g) / avg, and no second buffer for -lr * g.
                # The sign is folded into the scalar.
                np.multiply(d, neg_lr if sign > 0 else pos_lr, out=d)

        # ufunc calls per block: square average 4, denominator 2, delta 2, and extras.
        passes = 8 + (2 if wd != 0 else 0) + (6 if centered else 0) + (2 if momentum > 0 else 0)
        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            arrays = [
                g,
                p,
                state.square_avg[i],
                state.grad_avg[i] if centered else None,
                state.momentum_buffer[i] if momentum > 0 else None,
                out[i],
            ]
            elementwise(kernel, arrays, n_scratch=1 if wd != 0 else 0, passes=passes)
        state.step += 1
        return state


register(RMSprop())

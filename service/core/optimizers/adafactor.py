"""Adafactor (torch.optim.Adafactor): a factored second moment for matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import reductions
from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, as_float, check, shown
from service.core.kernels import elementwise
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class AdafactorState:
    step: int = 0
    row_var: list[np.ndarray] = field(default_factory=list)
    """Row factors of the second moment, shape ``(..., n, 1)``, one per tensor of two or
    more dimensions, in the group's tensor order."""
    col_var: list[np.ndarray] = field(default_factory=list)
    """Column factors, shape ``(..., 1, m)``, aligned with ``row_var``."""
    variance: list[np.ndarray] = field(default_factory=list)
    """Full second moments of the 0-D and 1-D tensors, in the group's tensor order."""


def _factored(shape: Shape) -> bool:
    return len(shape) > 1


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """torch's ``start.lerp_(end, weight)``, with its two formulas for accuracy."""
    if weight < 0.5:
        start += weight * (end - start)
    else:
        start[...] = end - (end - start) * (1 - weight)


def _norm(a: np.ndarray) -> float:
    """The 2-norm as torch returns it: a scalar of ``a``'s dtype (in a machine-independent
    order, see :mod:`service.core.reductions`)."""
    return float(a.dtype.type(reductions.norm2(a)))


class Adafactor(Optimizer[AdafactorState]):
    r"""Adafactor, torch 2.13's single-tensor update rule.

    .. math::
        \hat\beta_{2,t} &\leftarrow 1 - t^{\tau}, \quad
        \rho_t \leftarrow \min(\gamma, 1 / \sqrt t), \quad
        \alpha_t \leftarrow \max(\epsilon_2, \operatorname{RMS}(\theta_{t-1})) \rho_t \\
        \theta_{t-1} &\leftarrow \theta_{t-1} (1 - \gamma \lambda) \\
        R_t &\leftarrow \operatorname{lerp}(R_{t-1}, \operatorname{mean}_{-1}(g_t^2), t^{\tau}),
        \quad C_t \leftarrow \operatorname{lerp}(C_{t-1}, \operatorname{mean}_{-2}(g_t^2),
            t^{\tau}) \\
        \hat V_t &\leftarrow \frac{R_t C_t}{\max(\operatorname{mean}_{-2}(R_t), \epsilon_1)}
            \text{ (2-D and up) or } \operatorname{lerp}(\hat V_{t-1}, g_t^2, t^{\tau}) \\
        U_t &\leftarrow g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \quad
        \theta_t \leftarrow \theta_{t-1}
            - \frac{\alpha_t}{\max(1, \operatorname{RMS}(U_t) / d)} U_t

    :math:`g_t` is negated under ``maximize``; :math:`\tau` is ``beta2_decay``;
    ``eps = (eps1, eps2)`` with ``eps1=None`` meaning the machine epsilon of the session's
    dtype. Tensors of two or more dimensions keep row and column factors of the last two
    dimensions instead of a full second moment. The update always reads the parameters
    (for their RMS).
    """

    name = "Adafactor"
    args = (
        Arg("lr", "float", 1e-2, "learning rate: caps the relative step size"),
        Arg("beta2_decay", "float", -0.8, "decay rate of beta2"),
        Arg(
            "eps",
            "any",
            (None, 1e-3),
            "[eps1, eps2]: eps1 (null: the dtype's machine epsilon) stabilizes the "
            "denominator, eps2 floors the parameter scale",
        ),
        Arg("d", "float", 1.0, "clipping threshold of the update's RMS"),
        Arg("weight_decay", "float", 0.0, "decoupled weight decay coefficient"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    state_type = AdafactorState
    unsupported = ("foreach",)

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        given = dict(given)
        if "eps" in given:
            given["eps"] = _coerce_eps(given["eps"], f"{where}eps")
        return super().resolve(given, where)

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, beta2_decay, (eps1, eps2) = hp["lr"], hp["beta2_decay"], hp["eps"]
        d, wd = hp["d"], hp["weight_decay"]
        check(lr >= 0.0, f"{where}lr", f"Learning rate should be >= 0 but is: {lr}", lr)
        check(
            beta2_decay <= 0.0,
            f"{where}beta2_decay",
            f"beta2_decay should be <= 0 but is: {beta2_decay}",
            beta2_decay,
        )
        check(
            eps1 is None or eps1 >= 0.0,
            f"{where}eps",
            f"epsilon1 should be >= 0 but is: {eps1}",
            list(hp["eps"]),
        )
        check(
            eps2 >= 0.0, f"{where}eps", f"epsilon2 should be >= 0 but is: {eps2}", list(hp["eps"])
        )
        check(d >= 1.0, f"{where}d", f"Clipping threshold d should be >= 1 but is: {d}", d)
        check(wd >= 0.0, f"{where}weight_decay", f"weight_decay should be >= 0 but is: {wd}", wd)

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        # The step size scales with the parameters' RMS.
        return True

    def list_members(self, field: str, shapes: Sequence[Shape]) -> list[int]:
        factored = [i for i, shape in enumerate(shapes) if _factored(shape)]
        if field in ("row_var", "col_var"):
            return factored
        return [i for i in range(len(shapes)) if i not in factored]

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> AdafactorState:
        state = AdafactorState(step=0)
        for shape in shapes:
            if _factored(shape):
                state.row_var.append(np.zeros((*shape[:-1], 1), dtype=dtype))
                state.col_var.append(np.zeros((*shape[:-2], 1, shape[-1]), dtype=dtype))
            else:
                state.variance.append(np.zeros(shape, dtype=dtype))
        return state

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: AdafactorState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> AdafactorState:
        assert params is not None
        lr, beta2_decay, d_clip, wd = hp["lr"], hp["beta2_decay"], hp["d"], hp["weight_decay"]
        eps1, eps2 = hp["eps"]
        dtype = grads[0].dtype if grads else np.dtype(np.float32)
        if eps1 is None:
            eps1 = float(np.finfo(dtype).eps)
        sign = -1.0 if hp["maximize"] else 1.0

        step = float(state.step + 1)
        weight = step**beta2_decay
        rho = min(lr, 1 / step**0.5)
        decay = 1 - lr * wd

        factored = iter(zip(state.row_var, state.col_var, strict=True))
        variances = iter(state.variance)
        for g, p, d in zip(grads, params, out, strict=True):
            moments = next(factored) if g.ndim > 1 else next(variances)
            if g.size == 0:
                continue  # nothing to update, and torch's RMS would divide by zero
            if isinstance(moments, tuple):
                row_var, col_var = moments
                # torch squares the norm along an axis: mean of squares without a g^2 temporary.
                np.square(g, out=d)
                row_mean = np.sqrt(d.sum(axis=-1, keepdims=True))
                row_mean *= row_mean
                row_mean /= g.shape[-1]
                col_mean = np.sqrt(d.sum(axis=-2, keepdims=True))
                col_mean *= col_mean
                col_mean /= g.shape[-2]
                _lerp_(row_var, row_mean, weight)
                _lerp_(col_var, col_mean, weight)
                # d <- the variance estimate: the outer product, over the mean row factor.
                np.multiply(row_var, col_var, out=d)
                d /= np.maximum(row_var.mean(axis=-2, keepdims=True), eps1)
            else:
                _lerp_(moments, g * g, weight)
                d[...] = moments
            alpha = max(eps2, _norm(p) / math.sqrt(p.size)) * rho
            # d <- U = g / sqrt(max(V, eps1^2)), as torch's rsqrt_ then mul_.
            np.maximum(d, eps1 * eps1, out=d)
            np.sqrt(d, out=d)
            np.divide(1.0, d, out=d)
            d *= g
            clip = max(1.0, _norm(d) / (math.sqrt(d.size) * d_clip))
            scale = sign * -alpha / clip

            def kernel(
                p_: np.ndarray, d_: np.ndarray, s_: np.ndarray, scale: float = scale
            ) -> None:
                # d <- the decayed parameter plus the scaled update, then minus p: the delta.
                d_ *= scale
                np.multiply(p_, decay, out=s_)
                d_ += s_
                d_ -= p_

            elementwise(kernel, [p, d], n_scratch=1)
        state.step += 1
        return state


def _coerce_eps(value: Any, field: str) -> tuple[float | None, float]:
    """``eps`` as torch takes it: two entries, the first of which may be null."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        raise InvalidHyperparameter(
            field,
            f"{field} must be a list of two entries [eps1 or null, eps2], got {value!r}",
            value,
        )
    eps1, eps2 = value
    numbers_ok = all(
        isinstance(v, int | float) and not isinstance(v, bool)
        for v in (eps2, *(() if eps1 is None else (eps1,)))
    )
    if not numbers_ok:
        raise InvalidHyperparameter(
            field, f"{field} must hold numbers (eps1 may be null), got {shown(value)}", value
        )
    # as_float refuses an integer beyond the float range (instead of an OverflowError).
    first = None if eps1 is None else as_float(eps1, f"{field}[0]")
    second = as_float(eps2, f"{field}[1]")
    if any(v is not None and math.isnan(v) for v in (first, second)):
        raise InvalidHyperparameter(field, f"{field} must not hold NaN, got {value!r}", value)
    return (first, second)


register(Adafactor())

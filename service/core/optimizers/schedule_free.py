"""Schedule-free AdamW and SGD (package schedulefree: ``AdamWScheduleFree``, ``SGDScheduleFree``).

Defazio et al. (2024), "The Road Less Scheduled". The rule keeps two points per tensor:
``z``, the base sequence the gradient steps move, and ``x``, the running average of the
``z`` that is the point to evaluate. Gradients are taken at their interpolation
``y = (1 - beta1) z + beta1 x``, and ``y`` is what the parameters hold while training
(the package's ``train()`` mode), so a session's parameters are ``y`` and its state is
``z``; ``x`` is recovered from the two (:meth:`ScheduleFree.evaluation_point`), as the
package's ``eval()`` does.

The step count ``k``, the weight sum and the largest lr seen are kept per group, as the
package keeps them in ``param_groups``, and advance on every step whichever tensors had
a gradient: the state is not per tensor (``per_tensor_state = False``). A session reads a
missing gradient as zeros, so under ``missing_grads: "skip"`` such a tensor still moves
towards the average, where the package would leave it alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import constants, decay_add_square_, elementwise
from service.core.optimizers.base import Optimizer, Shape, register
from service.core.optimizers.muon import lerp


@dataclass
class ScheduleFreeState:
    k: int = 0
    """Steps taken by the group."""
    weight_sum: float = 0.0
    """Sum of the averaging weights so far."""
    lr_max: float = -1.0
    """Largest (warmed-up) lr seen, which weights the average."""
    z: list[np.ndarray] = field(default_factory=list)
    """The base sequence; the parameters' values at the first step."""
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    """AdamW's second moment; empty for SGD."""


def _shared_args() -> tuple[Arg, ...]:
    return (
        Arg("warmup_steps", "int", 0, "steps of linear learning-rate warmup"),
        Arg("r", "float", 0.0, "polynomial weighting power of the average"),
        Arg("weight_lr_power", "float", 2.0, "the average weights steps by lr_max to this power"),
    )


def power(base: float, exponent: float) -> float:
    """``base ** exponent`` as IEEE arithmetic has it: Python raises where the result
    overflows (``inf``) or is ``0.0`` to a negative power (``inf``); a session computes on."""
    try:
        return float(base**exponent)
    except (OverflowError, ZeroDivisionError):
        return math.inf


@dataclass(frozen=True)
class Averaging:
    """One step's scalars, computed as the package does in Python floats."""

    lr: float
    ckp1: float

    @classmethod
    def advance(cls, state: ScheduleFreeState, hp: Mapping[str, Any]) -> Averaging:
        k, warmup = state.k, hp["warmup_steps"]
        sched = (k + 1) / warmup if k < warmup else 1.0
        lr = hp["lr"] * sched
        state.lr_max = max(lr, state.lr_max)
        weight = power(k + 1, hp["r"]) * power(state.lr_max, hp["weight_lr_power"])
        state.weight_sum = state.weight_sum + weight
        try:
            ckp1 = weight / state.weight_sum
        except ZeroDivisionError:
            ckp1 = 0.0
        return cls(lr, ckp1)


class ScheduleFree(Optimizer[ScheduleFreeState]):
    """What both rules share: the averaging and the interpolated step of ``y``."""

    state_type = ScheduleFreeState
    reference = "schedulefree"
    per_tensor_state = False
    unsupported = ("foreach",)
    """Picks the package's foreach kernels: the same rule."""

    def momentum(self, hp: Mapping[str, Any]) -> float:
        """The interpolation weight ``beta1`` (``betas[0]`` or ``momentum``)."""
        raise NotImplementedError

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        return True  # z starts at the parameters, and y moves towards z

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> ScheduleFreeState:
        return ScheduleFreeState()

    def evaluation_point(
        self, state: ScheduleFreeState, params: Sequence[np.ndarray], hp: Mapping[str, Any]
    ) -> list[np.ndarray]:
        """``x``, what the package's ``eval()`` puts in the parameters: ``y.lerp(z, 1 - 1/beta1)``.

        Before the first step there is no ``z`` and the point is the parameters.
        """
        if not state.z:
            return [p.copy() for p in params]
        weight = 1 - 1 / self.momentum(hp)
        return [lerp(p, z, weight) for p, z in zip(params, state.z, strict=True)]

    def start(self, state: ScheduleFreeState, params: Sequence[np.ndarray] | None) -> None:
        if not state.z:
            assert params is not None, "schedule-free steps need parameter values"
            state.z = [p.copy() for p in params]

    def move(
        self,
        normalized: np.ndarray,
        y: np.ndarray,
        z: np.ndarray,
        d: np.ndarray,
        s: np.ndarray,
        consts: tuple[np.ndarray, ...],
    ) -> None:
        """``d`` <- ``y.lerp_(z, ckp1).add_(grad, alpha=lr (beta1 (1 - ckp1) - 1)) - y``
        and ``z.sub_(grad, alpha=lr)``, ``grad`` the normalized, decayed gradient."""
        ckp1, y_step, lr = consts
        np.subtract(z, y, out=d)
        np.multiply(d, ckp1, out=d)
        np.multiply(normalized, y_step, out=s)
        np.add(d, s, out=d)
        np.multiply(normalized, lr, out=s)
        np.subtract(z, s, out=z)


class AdamWScheduleFree(ScheduleFree):
    r"""Schedule-free AdamW, the package's single-tensor loop in its op order.

    .. math::
        v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        \hat g \leftarrow g / (\sqrt{v / (1 - \beta_2^{k+1})} + \epsilon) + \lambda y \\
        y &\leftarrow y + c_{k+1} (z - y) + \gamma_k (\beta_1 (1 - c_{k+1}) - 1) \hat g, \quad
        z \leftarrow z - \gamma_k \hat g

    with :math:`\gamma_k` the lr after warmup and :math:`c_{k+1}` the averaging weight.
    """

    name = "AdamWScheduleFree"
    args = (
        Arg("lr", "float", 0.0025, "learning rate"),
        Arg("betas", "float_pair", (0.9, 0.999), "interpolation weight and second-moment decay"),
        Arg("eps", "float", 1e-8, "added to the denominator for numerical stability"),
        Arg("weight_decay", "float", 0.0, "weight decay coefficient, applied at y"),
        *_shared_args(),
    )

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        # The package validates none of its arguments, but its eval() divides by beta1:
        # refused up front rather than failing when the evaluation point is asked for.
        beta1 = hp["betas"][0]
        check(
            beta1 != 0,
            f"{where}betas",
            f"betas[0] must not be 0: the evaluation point divides by it, got {beta1}",
            hp["betas"],
        )

    def momentum(self, hp: Mapping[str, Any]) -> float:
        return float(hp["betas"][0])

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: ScheduleFreeState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> ScheduleFreeState:
        beta1, beta2 = hp["betas"]
        decay = hp["weight_decay"]
        self.start(state, params)
        assert params is not None
        if not state.exp_avg_sq:
            state.exp_avg_sq = [np.zeros_like(g) for g in grads]
        bias_correction2 = 1 - power(beta2, state.k + 1)
        avg = Averaging.advance(state, hp)
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        beta2_, w2, bc2, eps, decay_, *consts = constants(
            dtype,
            beta2,
            1 - beta2,
            bias_correction2,
            hp["eps"],
            decay,
            avg.ckp1,
            avg.lr * (beta1 * (1 - avg.ckp1) - 1),
            avg.lr,
        )

        def kernel(
            g: np.ndarray,
            y: np.ndarray,
            z: np.ndarray,
            v: np.ndarray,
            d: np.ndarray,
            s: np.ndarray,
            t: np.ndarray,
        ) -> None:
            decay_add_square_(v, g, beta2_, w2, s)
            np.divide(v, bc2, out=s)
            np.sqrt(s, out=s)
            np.add(s, eps, out=s)
            np.divide(g, s, out=t)
            if decay != 0:
                np.multiply(y, decay_, out=s)
                np.add(t, s, out=t)
            self.move(t, y, z, d, s, tuple(consts))

        passes = 15 + (2 if decay != 0 else 0)
        for i, g in enumerate(grads):
            arrays = [g, params[i], state.z[i], state.exp_avg_sq[i], out[i]]
            elementwise(kernel, arrays, n_scratch=2, passes=passes)
        state.k += 1
        return state


class SGDScheduleFree(ScheduleFree):
    r"""Schedule-free SGD: the AdamW rule with :math:`\hat g = g + \lambda y`."""

    name = "SGDScheduleFree"
    args = (
        Arg("lr", "float", 1.0, "learning rate"),
        Arg("momentum", "float", 0.9, "interpolation weight between z and the average"),
        Arg("weight_decay", "float", 0.0, "weight decay coefficient, applied at y"),
        *_shared_args(),
    )

    def momentum(self, hp: Mapping[str, Any]) -> float:
        return float(hp["momentum"])

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, wd, momentum = hp["lr"], hp["weight_decay"], hp["momentum"]
        check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)
        check(
            0 < momentum < 1,
            f"{where}momentum",
            f"Momentum must be between 0 and 1 exclusive: {momentum}",
            momentum,
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: ScheduleFreeState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> ScheduleFreeState:
        momentum, decay = hp["momentum"], hp["weight_decay"]
        self.start(state, params)
        assert params is not None
        avg = Averaging.advance(state, hp)
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        decay_, *consts = constants(
            dtype, decay, avg.ckp1, avg.lr * (momentum * (1 - avg.ckp1) - 1), avg.lr
        )

        def kernel(
            g: np.ndarray, y: np.ndarray, z: np.ndarray, d: np.ndarray, s: np.ndarray, t: np.ndarray
        ) -> None:
            if decay != 0:
                np.multiply(y, decay_, out=t)
                np.add(g, t, out=t)
                g = t
            self.move(g, y, z, d, s, tuple(consts))

        passes = 6 + (2 if decay != 0 else 0)
        for i, g in enumerate(grads):
            elementwise(kernel, [g, params[i], state.z[i], out[i]], n_scratch=2, passes=passes)
        state.k += 1
        return state


register(AdamWScheduleFree())
register(SGDScheduleFree())

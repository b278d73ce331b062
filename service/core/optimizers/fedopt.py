"""Flower's adaptive server strategies (Reddi et al., 2020): FedAdagrad, FedAdam, FedYogi.

Each reproduces ``flwr.serverapp.strategy.<Name>.aggregate_train`` operation for operation.
With :math:`\\Delta_t = -g_t` (Flower's ``delta_t = aggregated - current``, the negative of
the round's pseudo-gradient) and :math:`t` the round (Flower's ``server_round``, from 1):

.. math::
    m_t &\\leftarrow \\beta_1 m_{t-1} + (1 - \\beta_1) \\Delta_t
        \\quad (\\text{FedAdagrad: } m_t = \\Delta_t) \\\\
    v_t &\\leftarrow v_{t-1} + \\Delta_t^2 \\quad \\text{(FedAdagrad)} \\\\
    v_t &\\leftarrow \\beta_2 v_{t-1} + (1 - \\beta_2) \\Delta_t^2 \\quad \\text{(FedAdam)} \\\\
    v_t &\\leftarrow v_{t-1} - (1 - \\beta_2) \\Delta_t^2
        \\operatorname{sign}(v_{t-1} - \\Delta_t^2) \\quad \\text{(FedYogi)} \\\\
    x_t &\\leftarrow x_{t-1} + \\eta_t\\, m_t / (\\sqrt{v_t} + \\tau)

with :math:`m_0 = v_0 = 0`, :math:`\\eta_t = \\eta` for FedAdagrad and FedYogi, and for
FedAdam Flower's bias-corrected
:math:`\\eta_t = \\eta \\sqrt{1 - \\beta_2^{t+1}} / (1 - \\beta_1^{t+1})` (the exponent is
``server_round + 1`` in Flower's code; reproduced as is). ``tau`` is added outside the
square root. ``eta_l``, the client learning rate, takes no part in the server's update;
Flower stores it for the clients, and optserve reports it in the round document.
Defaults are those of ``flwr.serverapp.strategy``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import elementwise
from service.core.optimizers.base import Shape, register
from service.core.optimizers.flower_args import FlowerStrategy


@dataclass
class FedOptState:
    step: int = 0
    """Rounds applied so far (Flower's ``server_round`` of the last one)."""
    m: list[np.ndarray] = field(default_factory=list)
    """First moment of the server update (not kept by FedAdagrad, where it is Delta_t)."""
    v: list[np.ndarray] = field(default_factory=list)
    """Second moment."""


def _lr(default: float) -> Arg:
    return Arg("lr", "float", default, "server learning rate (Flower: eta)")


def _eta_l(default: float) -> Arg:
    return Arg("eta_l", "float", default, "client learning rate, reported to clients")


_BETAS = (
    Arg("beta_1", "float", 0.9, "momentum parameter"),
    Arg("beta_2", "float", 0.99, "second moment parameter"),
)
_TAU = Arg("tau", "float", 1e-3, "degree of adaptability, added to sqrt(v)")


class FedOpt(FlowerStrategy[FedOptState]):
    """The shared part of the three: validation, state, the blocked update kernel."""

    aliases: ClassVar[Mapping[str, str]] = {"eta": "lr"}
    state_type = FedOptState
    keeps_momentum: ClassVar[bool] = True

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, tau, eta_l = hp["lr"], hp["tau"], hp["eta_l"]
        check(lr >= 0.0, f"{where}lr", f"Invalid server learning rate (eta): {lr}", lr)
        check(eta_l >= 0.0, f"{where}eta_l", f"Invalid client learning rate (eta_l): {eta_l}")
        check(tau > 0.0, f"{where}tau", f"Invalid tau value (must be > 0): {tau}", tau)
        for name in ("beta_1", "beta_2"):
            if name in hp:
                beta = hp[name]
                check(
                    0.0 <= beta < 1.0,
                    f"{where}{name}",
                    f"Invalid {name} parameter (must be in [0, 1)): {beta}",
                    beta,
                )

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> FedOptState:
        m = [np.zeros(s, dtype=dtype) for s in shapes] if self.keeps_momentum else []
        return FedOptState(step=0, m=m, v=[np.zeros(s, dtype=dtype) for s in shapes])

    def step_size(self, hp: Mapping[str, Any], server_round: int) -> float:
        return float(hp["lr"])

    def second_moment(
        self, v: np.ndarray, sq: np.ndarray, buf: np.ndarray, hp: Mapping[str, Any]
    ) -> None:
        """Advance ``v`` in place from ``sq`` = Delta_t**2 (which may be overwritten)."""
        raise NotImplementedError

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: FedOptState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> FedOptState:
        server_round = state.step + 1
        scale = self.step_size(hp, server_round)
        tau = hp["tau"]
        beta_1 = hp.get("beta_1", 0.0)

        def kernel(
            g: np.ndarray,
            m: np.ndarray | None,
            v: np.ndarray,
            d: np.ndarray,
            s: np.ndarray,
            u: np.ndarray,
        ) -> None:
            if m is not None:
                # m = beta_1 * m + (1 - beta_1) * delta, with delta = -g (negation is exact).
                m *= beta_1
                np.multiply(g, -(1.0 - beta_1), out=s)
                m += s
            np.multiply(g, g, out=s)
            self.second_moment(v, s, u, hp)
            np.sqrt(v, out=s)
            s += tau
            # x + (eta * m) / (sqrt(v) + tau); without a kept m, m = delta = -g.
            if m is not None:
                np.multiply(m, scale, out=d)
            else:
                np.multiply(g, -scale, out=d)
            d /= s

        for i, g in enumerate(grads):
            m = state.m[i] if self.keeps_momentum else None
            elementwise(kernel, [g, m, state.v[i], out[i]], n_scratch=2)
        state.step = server_round
        return state


class FedAdagrad(FedOpt):
    """Flower's FedAdagrad: no momentum (beta_1 = 0), the squares summed."""

    name = "FedAdagrad"
    args = (_lr(1e-1), _eta_l(1e-1), _TAU)
    keeps_momentum = False

    def second_moment(
        self, v: np.ndarray, sq: np.ndarray, buf: np.ndarray, hp: Mapping[str, Any]
    ) -> None:
        v += sq


class FedAdam(FedOpt):
    """Flower's FedAdam: Adam's moments with Flower's bias-corrected server step."""

    name = "FedAdam"
    args = (_lr(1e-1), _eta_l(1e-1), *_BETAS, _TAU)

    def step_size(self, hp: Mapping[str, Any], server_round: int) -> float:
        beta_1, beta_2 = hp["beta_1"], hp["beta_2"]
        exponent = server_round + 1.0
        return float(hp["lr"] * math.sqrt(1.0 - beta_2**exponent) / (1.0 - beta_1**exponent))

    def second_moment(
        self, v: np.ndarray, sq: np.ndarray, buf: np.ndarray, hp: Mapping[str, Any]
    ) -> None:
        beta_2 = hp["beta_2"]
        v *= beta_2
        sq *= 1.0 - beta_2
        v += sq


class FedYogi(FedOpt):
    """Flower's FedYogi: Yogi's additive, sign-controlled second moment."""

    name = "FedYogi"
    args = (_lr(1e-2), _eta_l(0.0316), *_BETAS, _TAU)

    def second_moment(
        self, v: np.ndarray, sq: np.ndarray, buf: np.ndarray, hp: Mapping[str, Any]
    ) -> None:
        # v - (1 - beta_2) * delta**2 * sign(v - delta**2), in Flower's order.
        np.subtract(v, sq, out=buf)
        np.sign(buf, out=buf)
        sq *= 1.0 - hp["beta_2"]
        sq *= buf
        v -= sq


register(FedAdagrad())
register(FedAdam())
register(FedYogi())

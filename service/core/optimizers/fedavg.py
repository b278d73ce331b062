"""Flower's FedAvg and FedAvgM server strategies, as optimizers of the pseudo-gradient.

Flower's FedAvgM (``flwr.serverapp.strategy.FedAvgM``) computes, per round::

    pseudo_gradient = current - aggregated            # "updates are the opposite of gradients"
    momentum_vector = pseudo_gradient                 # first round
                    = server_momentum * momentum_vector + pseudo_gradient   # later rounds
    new = current - server_learning_rate * momentum_vector

which is torch's SGD (no dampening, no Nesterov, the buffer starting as the first
gradient) applied to the pseudo-gradient, so both strategies delegate to optserve's SGD.
FedAvg is the special case Flower runs with the server optimizer off: with ``lr=1`` the new
global parameters are the weighted average of the clients' parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from service.core.hparams import Arg, check
from service.core.optimizers.base import Shape, register
from service.core.optimizers.flower_args import FlowerStrategy
from service.core.optimizers.sgd import SGD, SGDState

_SGD = SGD()


def _sgd_hparams(lr: float, momentum: float) -> dict[str, Any]:
    return {
        "lr": lr,
        "momentum": momentum,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }


class FedAvgM(FlowerStrategy[SGDState]):
    r"""Federated averaging with server momentum (Hsu et al., 2019), Flower's FedAvgM.

    .. math::
        b_t &\leftarrow g_t \text{ at } t=1, \text{ else } \beta b_{t-1} + g_t \\
        x_t &\leftarrow x_{t-1} - \eta\, b_t

    with :math:`g_t` the round's pseudo-gradient (current minus the weighted average).
    """

    name = "FedAvgM"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("lr", "float", 1.0, "server learning rate (Flower: server_learning_rate)"),
        Arg("momentum", "float", 0.0, "server momentum (Flower: server_momentum)"),
    )
    aliases: ClassVar[Mapping[str, str]] = {
        "server_learning_rate": "lr",
        "server_momentum": "momentum",
    }
    state_type = SGDState

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, momentum = hp["lr"], hp["momentum"]
        check(lr >= 0.0, f"{where}lr", f"Invalid server learning rate: {lr}", lr)
        check(momentum >= 0.0, f"{where}momentum", f"Invalid server momentum: {momentum}", momentum)

    def _sgd(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        return _sgd_hparams(hp["lr"], hp["momentum"])

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> SGDState:
        return _SGD.init(shapes, self._sgd(hp), dtype)

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: SGDState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> SGDState:
        return _SGD.update(grads, state, None, self._sgd(hp), out)


class FedAvg(FedAvgM):
    r"""Federated averaging (McMahan et al., 2017), Flower's FedAvg.

    .. math:: x_t \leftarrow x_{t-1} - \eta\, g_t

    With the default :math:`\eta = 1` the new global parameters are the (weighted) average
    of the clients' parameters; another :math:`\eta` is a server step size along the
    averaged update ("FedAvg with server learning rate", Reddi et al., 2020).
    """

    name = "FedAvg"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("lr", "float", 1.0, "server learning rate; 1 takes the clients' average"),
    )
    aliases: ClassVar[Mapping[str, str]] = {"server_learning_rate": "lr"}

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr = hp["lr"]
        check(lr >= 0.0, f"{where}lr", f"Invalid server learning rate: {lr}", lr)

    def _sgd(self, hp: Mapping[str, Any]) -> dict[str, Any]:
        return _sgd_hparams(hp["lr"], 0.0)


register(FedAvg())
register(FedAvgM())

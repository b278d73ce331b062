"""Lion (package lion-pytorch, ``lion_pytorch.Lion``): the sign of an interpolated momentum.

Chen et al. (2023), "Symbolic Discovery of Optimization Algorithms". The rule keeps one
moving average per tensor and no step count, so partial steps skip tensors as torch does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.hparams import Arg, check
from service.core.kernels import constants, elementwise
from service.core.optimizers.base import Optimizer, Shape, register


@dataclass
class LionState:
    init_lr: float = 0.0
    """The constructor's ``lr``: lion-pytorch divides a decoupled weight decay by it."""
    exp_avg: list[np.ndarray] = field(default_factory=list)


class Lion(Optimizer[LionState]):
    r"""lion-pytorch's ``update_fn``, in its op order.

    .. math::
        \theta &\leftarrow \theta (1 - \gamma \lambda) \\
        \theta &\leftarrow \theta - \gamma\, \mathrm{sign}(\beta_1 m + (1 - \beta_1) g) \\
        m &\leftarrow \beta_2 m + (1 - \beta_2) g

    With ``decoupled_weight_decay`` the package uses :math:`\lambda / \gamma_0`,
    :math:`\gamma_0` the constructor's ``lr`` (not the group's, not the scheduled one),
    so the decay per step is :math:`\gamma \lambda / \gamma_0`.
    """

    name = "Lion"
    args = (
        Arg("lr", "float", 1e-4, "learning rate"),
        Arg("betas", "float_pair", (0.9, 0.99), "interpolation and momentum decay rates"),
        Arg("weight_decay", "float", 0.0, "weight decay coefficient"),
        Arg(
            "decoupled_weight_decay",
            "bool",
            False,
            "divide weight_decay by the constructor's lr, so the decay scales with lr / lr0",
        ),
    )
    reference = "lion-pytorch"
    unsupported = ("use_triton",)
    """Picks lion-pytorch's Triton kernel: the same rule."""
    state_type = LionState

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        # lion-pytorch asserts these (``assert lr > 0.``), with no message of its own.
        check(hp["lr"] > 0.0, f"{where}lr", f"Invalid learning rate: {hp['lr']}", hp["lr"])
        for i, beta in enumerate(hp["betas"]):
            check(
                0.0 <= beta <= 1.0,
                f"{where}betas",
                f"Invalid beta parameter at index {i}: {beta}",
                hp["betas"],
            )

    def init_hparams(
        self, group: Mapping[str, Any], constructor: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        return {**group, "init_lr": constructor.get("lr", group["lr"])}

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> LionState:
        return LionState(
            init_lr=float(hp.get("init_lr", hp["lr"])),
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: LionState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> LionState:
        lr, wd = hp["lr"], hp["weight_decay"]
        beta1, beta2 = hp["betas"]
        if hp["decoupled_weight_decay"]:
            wd = wd / state.init_lr
        dtype = np.dtype(grads[0].dtype) if grads else np.dtype(np.float64)
        beta1_, w1, beta2_, w2, neg_lr, decay_factor = constants(
            dtype, beta1, 1 - beta1, beta2, 1 - beta2, -lr, 1 - lr * wd
        )

        def kernel(
            g: np.ndarray, p: np.ndarray | None, m: np.ndarray, d: np.ndarray, s: np.ndarray
        ) -> None:
            # update = sign(m beta1 + g (1 - beta1)); sign(x) times -lr is exact.
            np.multiply(m, beta1_, out=d)
            np.multiply(g, w1, out=s)
            np.add(d, s, out=d)
            np.sign(d, out=d)
            np.multiply(d, neg_lr, out=d)
            if p is not None:
                # lion-pytorch rounds p (1 - lr wd) first; p c - p is exact, so the delta
                # carries that rounded decay.
                np.multiply(p, decay_factor, out=s)
                np.subtract(s, p, out=s)
                np.add(d, s, out=d)
            np.multiply(m, beta2_, out=m)
            np.multiply(g, w2, out=s)
            np.add(m, s, out=m)

        passes = 8 + (3 if wd != 0 else 0)
        for i, g in enumerate(grads):
            p = None
            if wd != 0:
                assert params is not None, "weight decay needs parameter values"
                p = params[i]
            elementwise(kernel, [g, p, state.exp_avg[i], out[i]], n_scratch=1, passes=passes)
        return state


register(Lion())

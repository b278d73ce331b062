"""The arguments Adam, AdamW, Adamax, NAdam and RAdam share: declarations and torch's checks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.hparams import Arg, check, check_non_negative


def adam_args(lr: float, weight_decay: float = 0.0) -> tuple[Arg, ...]:
    """``lr, betas, eps, weight_decay`` in torch's order, with torch's defaults."""
    return (
        Arg("lr", "float", lr, "learning rate"),
        Arg("betas", "float_pair", (0.9, 0.999), "decay rates of the first and second moments"),
        Arg("eps", "float", 1e-8, "added to the denominator for numerical stability"),
        Arg("weight_decay", "float", weight_decay, "weight decay coefficient"),
    )


def validate_adam_args(hp: Mapping[str, Any], where: str = "") -> None:
    """torch's checks, in torch's order, with torch's messages."""
    beta1, beta2 = hp["betas"]
    check_non_negative(hp, ("lr", "eps"), where)
    check(
        0.0 <= beta1 < 1.0,
        f"{where}betas",
        f"Invalid beta parameter at index 0: {beta1}",
        hp["betas"],
    )
    check(
        0.0 <= beta2 < 1.0,
        f"{where}betas",
        f"Invalid beta parameter at index 1: {beta2}",
        hp["betas"],
    )
    check_non_negative(hp, ("weight_decay",), where)


@dataclass(frozen=True)
class Moments:
    """NAdam's and RAdam's shared first half of a step, in torch's op order."""

    sign: float
    """-1 with ``maximize``, else 1."""
    coupled_wd: float | None
    """The L2 coefficient added to the gradient; ``None`` without coupled decay."""
    beta1: float
    beta2: float

    def update_(
        self,
        g: np.ndarray,
        p: np.ndarray | None,
        m: np.ndarray,
        v: np.ndarray,
        s: np.ndarray,
        t: np.ndarray,
    ) -> None:
        """``t`` <- the effective gradient, then the moments ``m`` and ``v``; ``s`` is
        scratch."""
        np.multiply(g, self.sign, out=t)
        if self.coupled_wd is not None:
            assert p is not None, "coupled weight decay needs parameter values"
            np.multiply(p, self.coupled_wd, out=s)
            t += s
        # m <- m + w1 (t - m), torch's lerp_.
        np.subtract(t, m, out=s)
        s *= 1 - self.beta1
        m += s
        # v <- beta2 v + (1 - beta2) t^2, torch's mul_ then addcmul_.
        v *= self.beta2
        np.multiply(t, 1 - self.beta2, out=s)
        s *= t
        v += s


def moment_arrays(
    grads: Sequence[np.ndarray],
    params: Sequence[np.ndarray] | None,
    exp_avg: Sequence[np.ndarray],
    exp_avg_sq: Sequence[np.ndarray],
    out: Sequence[np.ndarray],
    needs_p: bool,
) -> Iterator[list[np.ndarray]]:
    """Per tensor: ``[g, (p,) m, v, out]``, the arrays NAdam's and RAdam's kernels take."""
    for i, g in enumerate(grads):
        arrays = [g]
        if needs_p:
            assert params is not None
            arrays.append(params[i])
        arrays += [exp_avg[i], exp_avg_sq[i], out[i]]
        yield arrays

"""Muon (torch.optim.Muon): momentum orthogonalized by a Newton-Schulz iteration, 2-D only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import bfloat16
from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, check
from service.core.optimizers.base import Optimizer, Shape, register

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""torch's default (a, b, c) of the quintic Newton-Schulz polynomial."""
ADJUST_LR_FNS = ("original", "match_rms_adamw")
MAX_NS_STEPS = 100


@dataclass
class MuonState:
    momentum_buffer: list[np.ndarray] = field(default_factory=list)


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch's ``start.lerp(end, weight)`` on the CPU, as a new array.

    torch evaluates ``fma(w, end - start, start)`` for ``w < 0.5`` and
    ``fma(w - 1, end - start, end)`` otherwise, in the tensors' dtype. For float32 the
    fused multiply-add is exact in float64 and then rounded once, which matters here:
    the result is rounded to bfloat16 next, and a last-bit difference can flip that.
    """
    dtype = start.dtype
    w = dtype.type(weight)
    small = abs(w) < 0.5
    coeff = w if small else w - dtype.type(1)
    diff: np.ndarray = end - start
    base = start if small else end
    if dtype == np.float32:
        exact = diff.astype(np.float64)
        exact *= np.float64(coeff)
        exact += base
        return exact.astype(np.float32)
    fused: np.ndarray = diff * coeff
    fused += base
    return fused


def newton_schulz(
    update: np.ndarray, coefficients: Sequence[float], steps: int, eps: float
) -> np.ndarray:
    """torch's ``_zeropower_via_newtonschulz``: the iteration runs in bfloat16.

    Returns a float32 array of bfloat16 values, shaped like ``update``.
    """
    a, b, c = coefficients
    x = bfloat16.from_array(update)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = np.ascontiguousarray(x.T)
    # Spectral norm at most 1: divide by the Frobenius norm, clamped away from zero.
    norm = max(bfloat16.frobenius_norm(x), np.float32(eps))
    norm = bfloat16.round_(np.array([norm], dtype=np.float32))[0]
    # A zero update with eps <= 0 divides 0 by 0: nan, as in torch, without a warning.
    with np.errstate(divide="ignore", invalid="ignore"):
        x /= norm
    bfloat16.round_(x)
    for _ in range(steps):
        gram = bfloat16.addmm(None, x, x.T, beta=0.0, alpha=1.0)
        gram_update = bfloat16.addmm(gram, gram, gram, beta=b, alpha=c)
        x = bfloat16.addmm(x, gram_update, x, beta=a, alpha=1.0)
    return np.ascontiguousarray(x.T) if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Shape) -> float:
    """torch's ``_adjust_lr``: the same update RMS whatever the matrix's aspect ratio."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio


class Muon(Optimizer[MuonState]):
    r"""Muon, torch 2.13's update rule, for 2-D parameters only.

    .. math::
        B_t &\leftarrow B_{t-1} + (1 - \mu)(g_t - B_{t-1}) \\
        \tilde B_t &\leftarrow g_t + \mu (B_t - g_t) \text{ (nesterov) or } B_t \\
        O_t &\leftarrow \mathrm{NS}^{(a,b,c)}_k(\tilde B_t; \epsilon) \\
        \theta_t &\leftarrow \theta_{t-1}(1 - \gamma \lambda) - \gamma' O_t

    :math:`\mathrm{NS}` is ``ns_steps`` iterations of
    :math:`X \leftarrow aX + (bA + cA^2)X`, :math:`A = XX^\top`, on the (transposed if
    tall) matrix scaled to Frobenius norm 1, computed in bfloat16 exactly as torch does.
    :math:`\gamma' = \gamma \sqrt{\max(1, A/B)}` (``adjust_lr_fn`` "original" or null) or
    :math:`0.2 \gamma \sqrt{\max(A, B)}` ("match_rms_adamw") for an ``A x B`` matrix.
    """

    name = "Muon"
    args = (
        Arg("lr", "float", 1e-3, "learning rate"),
        Arg("weight_decay", "float", 0.1, "decoupled weight decay"),
        Arg("momentum", "float", 0.95, "momentum factor"),
        Arg("nesterov", "bool", True, "Nesterov momentum"),
        Arg(
            "ns_coefficients",
            "float_list",
            NS_COEFFICIENTS,
            "(a, b, c) of the Newton-Schulz polynomial",
        ),
        Arg("eps", "float", 1e-7, "floor of the norm the update is divided by"),
        Arg("ns_steps", "int", 5, "Newton-Schulz iterations"),
        Arg(
            "adjust_lr_fn",
            "str",
            None,
            "scaling of lr by the matrix shape: original (default) or match_rms_adamw",
            nullable=True,
            choices=ADJUST_LR_FNS,
        ),
    )
    state_type = MuonState
    unsupported = ()
    """torch's Muon takes no foreach, fused, capturable or differentiable argument."""

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        fn = given.get("adjust_lr_fn")
        if isinstance(fn, str) and fn not in ADJUST_LR_FNS:
            raise InvalidHyperparameter(
                f"{where}adjust_lr_fn",
                f"Adjust learning rate function {fn} is not supported",
                fn,
            )
        return super().resolve(given, where)

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr, momentum, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
        check(lr >= 0.0, f"{where}lr", f"Learning rate should be >= 0 but is: {lr}", lr)
        check(
            momentum >= 0.0,
            f"{where}momentum",
            f"momentum should be >= 0 but is: {momentum}",
            momentum,
        )
        check(wd >= 0.0, f"{where}weight_decay", f"weight decay should be >= 0 but is: {wd}", wd)
        # torch checks these two when the first step runs; here they fail at creation.
        steps, coefficients = hp["ns_steps"], hp["ns_coefficients"]
        check(
            steps < MAX_NS_STEPS,
            f"{where}ns_steps",
            "Number of steps must be less than 100 for computational efficiency",
            steps,
        )
        check(
            len(coefficients) == 3,
            f"{where}ns_coefficients",
            "Coefficients must be a tuple of exactly 3 values",
            coefficients,
        )

    def check_shapes(self, shapes: Sequence[Shape], hp: Mapping[str, Any]) -> None:
        for shape in shapes:
            if len(shape) != 2:
                raise InvalidHyperparameter(
                    "params",
                    "Muon only supports 2D parameters whereas we found a parameter with "
                    f"size: {list(shape)}",
                    list(shape),
                )

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> MuonState:
        return MuonState(momentum_buffer=[np.zeros(s, dtype=dtype) for s in shapes])

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: MuonState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> MuonState:
        lr, wd, momentum = hp["lr"], hp["weight_decay"], hp["momentum"]
        decay = 1 - lr * wd
        for i, (g, buf, d) in enumerate(zip(grads, state.momentum_buffer, out, strict=True)):
            buf[...] = lerp(buf, g, 1 - momentum)
            if g.size == 0:
                continue  # nothing to orthogonalize, and the lr ratio would divide by zero
            direction = lerp(g, buf, momentum) if hp["nesterov"] else buf
            ortho = newton_schulz(direction, hp["ns_coefficients"], hp["ns_steps"], hp["eps"])
            step = -adjusted_lr(lr, hp["adjust_lr_fn"], g.shape)
            # d <- the parameter after mul_(decay) and add_(ortho, alpha=step), fused as
            # torch's kernel is; then minus the old parameter: the delta.
            if params is None:
                d[...] = ortho * np.float64(d.dtype.type(step))
                continue
            p = params[i]
            decayed = p * decay
            if d.dtype == np.float32:
                fused = ortho.astype(np.float64)
                fused *= np.float64(np.float32(step))
                fused += decayed
                d[...] = fused
            else:
                # A float64 scalar: a Python float would make numpy multiply in float32.
                np.multiply(ortho, np.float64(step), out=d)
                d += decayed
            d -= p
        return state


register(Muon())

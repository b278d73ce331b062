"""Prodigy (package prodigyopt, ``prodigyopt.Prodigy``): Adam with a learned step size d.

Mishchenko and Defazio (2024), "Prodigy: An Expeditiously Adaptive Parameter-Free
Learner". The step size ``d`` is estimated from every tensor of every group at once: a
step sums a numerator (gradients against the distance travelled from the starting point)
and a denominator (the norm of a running gradient sum) over all groups, and all groups
then step with the one new ``d``. So the rule couples its groups
(``whole_step``): a session steps them together in :meth:`Prodigy.update_groups`.

The package reads the shared scalars (``d``, ``d_max``, ``d_numerator``, ``k``) and the
arguments that shape the estimate (``betas``, ``beta3``, ``d_coef``, ``growth_rate``,
``use_bias_correction``, ``decouple``) from the first group, and ``lr`` is the largest
group lr; each group keeps its own ``weight_decay``, ``eps``, ``d0``,
``safeguard_warmup`` and ``slice_p``. After a step every group holds the same estimate,
as the package writes it into every ``param_group``, so any group's record shows it.

State per tensor is the package's: ``exp_avg``, ``exp_avg_sq``, the running sum ``s`` and
the starting point ``p0`` (every ``slice_p``-th entry), made at the tensor's first step
with a gradient. A tensor without a gradient is skipped as the package skips it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import reductions
from service.core.errors import InvalidHyperparameter
from service.core.hparams import Arg, check
from service.core.kernels import constants, decay_add_square_, elementwise
from service.core.optimizers.base import Optimizer, Shape, register
from service.core.optimizers.restored import mismatch as restored_mismatch


@dataclass
class ProdigyState:
    d: float = 0.0
    """The step-size estimate (starts at ``d0``)."""
    d_max: float = 0.0
    d_numerator: float = 0.0
    """The estimate's running numerator, decayed by ``beta3`` each step."""
    d_hat: float = 0.0
    """The last raw estimate ``d_coef * numerator / denominator``."""
    k: int = 0
    """Steps taken (a step without any gradient signal does not count, as in the package)."""
    started: list[bool] = field(default_factory=list)
    """Per tensor: whether ``p0`` is set (the package makes a tensor's state at its first
    step with a gradient)."""
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    s: list[np.ndarray] = field(default_factory=list)
    p0: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class _Shared:
    """What one step reads from the first group and the largest lr (the package's order)."""

    beta1: float
    beta2: float
    beta3: float
    d: float
    d_max: float
    d_numerator: float
    dlr: float
    """d times the largest group lr (times the bias correction): this step's size."""
    decouple: bool


def _sliced(a: np.ndarray, slice_p: int) -> np.ndarray:
    return a.reshape(-1)[::slice_p]


def _rounded(value: float, dtype: np.dtype[Any]) -> float:
    return float(dtype.type(value))


class Prodigy(Optimizer[ProdigyState]):
    r"""prodigyopt's ``step``, in its op order.

    .. math::
        \hat d &= d_{coef} \frac{\beta_3 r + \sum_i (d / d_0)\, d \gamma\,
            \langle g_i, p_{0,i} - p_i \rangle}{\sum_i \lVert s_i \rVert_1},
        \qquad s_i \leftarrow \beta_3 s_i + (d / d_0)\, d \gamma\, g_i \\
        d &\leftarrow \min(\max(d_{max}, \hat d), d \cdot growth\_rate) \\
        \theta &\leftarrow \theta - d_{old} \gamma\, m / (\sqrt{v} + d \epsilon)

    with :math:`m, v` Adam's moments of :math:`d g`.
    """

    name = "Prodigy"
    args = (
        Arg("lr", "float", 1.0, "multiplier of the estimated step size d"),
        Arg("betas", "float_pair", (0.9, 0.999), "Adam's moment decay rates"),
        Arg("beta3", "float", None, "decay of the d estimate's sums; null: sqrt(betas[1])", True),
        Arg("eps", "float", 1e-8, "added to the denominator, times d"),
        Arg("weight_decay", "float", 0.0, "weight decay coefficient"),
        Arg("decouple", "bool", True, "AdamW-style decoupled weight decay"),
        Arg("use_bias_correction", "bool", False, "Adam's bias correction of the step"),
        Arg("safeguard_warmup", "bool", False, "leave lr out of the estimate's denominator"),
        Arg("d0", "float", 1e-6, "initial d estimate"),
        Arg("d_coef", "float", 1.0, "coefficient of the d estimate"),
        Arg("growth_rate", "float", math.inf, "largest factor d may grow by per step"),
        Arg("slice_p", "int", 1, "estimate d from every slice_p-th entry of each tensor"),
    )
    reference = "prodigyopt"
    unsupported = ("fsdp_in_use",)
    """Sums the estimate across FSDP shards with torch.distributed: a session holds whole
    tensors, so there is nothing to sum across."""
    state_type = ProdigyState
    whole_step = True

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        d0, lr, eps = hp["d0"], hp["lr"], hp["eps"]
        check(d0 > 0.0, f"{where}d0", f"Invalid d0 value: {d0}", d0)
        check(lr > 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        check(eps > 0.0, f"{where}eps", f"Invalid epsilon value: {eps}", eps)
        for i, beta in enumerate(hp["betas"]):
            check(
                0.0 <= beta < 1.0,
                f"{where}betas",
                f"Invalid beta parameter at index {i}: {beta}",
                hp["betas"],
            )
        # The package checks none of these; outside these ranges its run is meaningless
        # rather than failing: beta3 above 1 makes the estimate's sums extrapolate, a d_coef
        # of 0 or below makes every estimate 0 or negative and a growth_rate below 1 caps
        # d below itself, so d stays d0 forever (d = max(d, min(d_hat, d * growth_rate))).
        beta3 = hp["beta3"]
        check(
            beta3 is None or 0.0 <= beta3 <= 1.0,
            f"{where}beta3",
            f"Invalid beta3 value: {beta3}",
            beta3,
        )
        d_coef, growth_rate, wd = hp["d_coef"], hp["growth_rate"], hp["weight_decay"]
        check(d_coef > 0.0, f"{where}d_coef", f"Invalid d_coef value: {d_coef}", d_coef)
        check(
            growth_rate >= 1.0,
            f"{where}growth_rate",
            f"Invalid growth_rate value: {growth_rate} (d could never grow)",
            growth_rate,
        )
        check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)
        # The package slices with [::slice_p], which fails on anything below 1.
        slice_p = hp["slice_p"]
        check(slice_p >= 1, f"{where}slice_p", f"slice_p must be at least 1: {slice_p}", slice_p)

    def check_groups(self, hps: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
        lr = max(hp["lr"] for hp in hps)
        for hp, where in zip(hps, fields, strict=True):
            if hp["lr"] not in (lr, 0.0):
                raise InvalidHyperparameter(
                    f"{where}lr",
                    "Setting different lr values in different parameter groups is only "
                    "supported for values of 0",
                    hp["lr"],
                )

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        return True  # the estimate measures the distance from the starting point

    def check_restored(self, restored: ProdigyState, fresh: ProdigyState) -> str:
        names = ("d", "d_max", "d_numerator", "d_hat", "k", "started")
        why = restored_mismatch(restored, fresh, names)
        if why:
            return why
        # d starts at d0 > 0 and never shrinks; later steps divide by it.
        if not (0.0 < restored.d < math.inf and 0.0 < restored.d_max < math.inf):
            return f"d {restored.d} and d_max {restored.d_max} must be positive and finite"
        return f"k {restored.k} is negative" if restored.k < 0 else ""

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> ProdigyState:
        slice_p = hp["slice_p"]
        sliced = [len(range(0, math.prod(s), slice_p)) for s in shapes]
        return ProdigyState(
            d=hp["d0"],
            d_max=hp["d0"],
            started=[False] * len(shapes),
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes] if hp["betas"][0] > 0 else [],
            exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes],
            s=[np.zeros(n, dtype=dtype) for n in sliced],
            p0=[np.zeros(n, dtype=dtype) for n in sliced],
        )

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: ProdigyState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> ProdigyState:
        return self.update_groups([grads], [state], [params], [hp], [out])[0]

    def update_groups(
        self,
        grads: Sequence[Sequence[np.ndarray | None]],
        states: Sequence[ProdigyState],
        params: Sequence[Sequence[np.ndarray] | None],
        hps: Sequence[Mapping[str, Any]],
        outs: Sequence[Sequence[np.ndarray]],
    ) -> list[ProdigyState]:
        shared = self._shared(states[0], hps)
        numerator, denominator = 0.0, 0.0
        for g, st, p, hp in zip(grads, states, params, hps, strict=True):
            assert p is not None, "Prodigy reads parameter values"
            num, den = self._accumulate(g, st, p, hp, shared)
            numerator += num
            denominator += den
        for out in outs:
            for o in out:
                o.fill(0)
        if denominator == 0:
            # No gradient signal at all: the package returns before estimating or stepping
            # (its moments have moved, its step counts have not).
            return list(states)
        d_numerator = shared.d_numerator * shared.beta3 + numerator
        first = hps[0]
        d, d_max = shared.d, shared.d_max
        d_hat = first["d_coef"] * d_numerator / denominator
        # The package compares with the d0 of the last group its loop visited.
        if d == hps[-1]["d0"]:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])
        for g, st, p, hp, out in zip(grads, states, params, hps, outs, strict=True):
            assert p is not None
            st.d, st.d_max, st.d_numerator, st.d_hat = d, d_max, d_numerator, d_hat
            self._step(g, st, p, hp, out, shared, d)
            st.k += 1
        return list(states)

    def _shared(self, first: ProdigyState, hps: Sequence[Mapping[str, Any]]) -> _Shared:
        hp = hps[0]
        beta1, beta2 = hp["betas"]
        beta3 = hp["beta3"] if hp["beta3"] is not None else math.sqrt(beta2)
        lr = max(h["lr"] for h in hps)
        k = first.k
        bias_correction = 1.0
        if hp["use_bias_correction"]:
            bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
        return _Shared(
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            d=first.d,
            d_max=first.d_max,
            d_numerator=first.d_numerator,
            dlr=first.d * lr * bias_correction,
            decouple=hp["decouple"],
        )

    def _grad(self, g: np.ndarray, p: np.ndarray, hp: Mapping[str, Any], sh: _Shared) -> np.ndarray:
        """The gradient with coupled weight decay added, as the package adds it in place."""
        decay = hp["weight_decay"]
        if decay == 0 or sh.decouple:
            return g
        (decay_,) = constants(g.dtype, decay)
        decayed: np.ndarray = g + p * decay_
        return decayed

    def _accumulate(
        self,
        grads: Sequence[np.ndarray | None],
        st: ProdigyState,
        params: Sequence[np.ndarray],
        hp: Mapping[str, Any],
        sh: _Shared,
    ) -> tuple[float, float]:
        """Advance the moments and ``s`` of the group's stepped tensors; return the group's
        share of the estimate's numerator and denominator."""
        d, d0, slice_p = sh.d, hp["d0"], hp["slice_p"]
        numerator, denominator = 0.0, 0.0
        for i, (g_, p) in enumerate(zip(grads, params, strict=True)):
            if g_ is None:
                continue
            g = self._grad(g_, p, hp, sh)
            if not st.started[i]:
                st.p0[i][...] = _sliced(p, slice_p)
                st.started[i] = True
            if sh.beta1 > 0 and not st.exp_avg:
                st.exp_avg = [np.zeros_like(v) for v in st.exp_avg_sq]
            if hp["lr"] <= 0.0:
                continue  # a frozen group (lr 0) neither moves its moments nor the estimate
            sliced = _sliced(g, slice_p)
            # The package's sums are float32 tensors read with .item(): rounded to the dtype.
            dot = _rounded(reductions.dot(sliced, st.p0[i] - _sliced(p, slice_p)), g.dtype)
            numerator += (d / d0) * sh.dlr * dot
            self._moments(g, st, i, sh)
            s_scale = (d / d0) * (d if hp["safeguard_warmup"] else sh.dlr)
            beta3_, s_scale_ = constants(g.dtype, sh.beta3, s_scale)
            s = st.s[i]
            np.multiply(s, beta3_, out=s)
            s += sliced * s_scale_
            denominator += _rounded(reductions.abs_total(s), g.dtype)
        return numerator, denominator

    def _moments(self, g: np.ndarray, st: ProdigyState, i: int, sh: _Shared) -> None:
        d = sh.d
        beta1_, w1, beta2_, w2 = constants(
            g.dtype, sh.beta1, d * (1 - sh.beta1), sh.beta2, d * d * (1 - sh.beta2)
        )
        has_m = sh.beta1 > 0

        def kernel(g: np.ndarray, m: np.ndarray | None, v: np.ndarray, t: np.ndarray) -> None:
            if m is not None:
                np.multiply(m, beta1_, out=m)
                np.multiply(g, w1, out=t)
                np.add(m, t, out=m)
            decay_add_square_(v, g, beta2_, w2, t)

        m = st.exp_avg[i] if has_m else None
        elementwise(kernel, [g, m, st.exp_avg_sq[i]], n_scratch=1, passes=7)

    def _step(
        self,
        grads: Sequence[np.ndarray | None],
        st: ProdigyState,
        params: Sequence[np.ndarray],
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
        sh: _Shared,
        d: float,
    ) -> None:
        """Write the deltas of the group's stepped tensors with the new estimate ``d``."""
        decay = hp["weight_decay"]
        decoupled = decay != 0 and sh.decouple
        has_m = sh.beta1 > 0
        deps, neg_decay, scale = constants(
            out[0].dtype if out else np.dtype(np.float64),
            d * hp["eps"],
            -decay * sh.dlr,
            -sh.dlr if has_m else -sh.dlr * d,
        )

        def kernel(
            num: np.ndarray, p: np.ndarray | None, v: np.ndarray, o: np.ndarray, t: np.ndarray
        ) -> None:
            # p += p (-decay dlr), then p.addcdiv_(m, sqrt(v) + d eps, value=-dlr).
            np.sqrt(v, out=t)
            np.add(t, deps, out=t)
            np.divide(num, t, out=o)
            np.multiply(o, scale, out=o)
            if p is not None:
                # The package rounds p + p (-decay dlr) before adding the step, and at a small
                # dlr that rounding is most of the decay; (p + p c) - p is exact, so the delta
                # carries the rounded decay rather than the ideal one.
                np.multiply(p, neg_decay, out=t)
                np.add(p, t, out=t)
                np.subtract(t, p, out=t)
                np.add(o, t, out=o)

        for i, (g_, p) in enumerate(zip(grads, params, strict=True)):
            if g_ is None:
                continue
            num = st.exp_avg[i] if has_m else self._grad(g_, p, hp, sh)
            arrays = [num, p if decoupled else None, st.exp_avg_sq[i], out[i]]
            elementwise(kernel, arrays, n_scratch=1, passes=8)


register(Prodigy())

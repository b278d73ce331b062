"""SOAP (package pytorch_optimizer, ``pytorch_optimizer.SOAP``): Adam in Shampoo's eigenbasis.

Vyas et al. (2024), "SOAP: Improving and Stabilizing Shampoo using Adam". Each dimension
of a tensor (up to ``max_precondition_dim``) keeps Shampoo's statistic ``GG``, a moving
average of the gradient's outer product over the other dimensions, and an orthogonal
basis ``Q`` of it: ``eigh`` when the tensor starts, then every ``precondition_frequency``
steps one power iteration and a QR decomposition. Adam's moments run in that basis: the
gradient is projected into it, the second moment is kept there, and the step is projected
back.

The package's step count is per group and advances on every step whichever tensors have
a gradient, while a tensor's state starts at its first gradient: so SOAP steps whole
groups (``whole_step``), seeing a missing gradient as ``None`` and leaving that tensor
alone, as the package does. Its very first step only gathers statistics and moves nothing.

Bases come from LAPACK (``numpy.linalg``, which computes in float64 whatever the input),
where torch runs LAPACK in the tensor's dtype: docs/torch-compatibility.md gives the
differences this leaves.
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
from service.core.optimizers.base import Optimizer, Shape, register
from service.core.optimizers.muon import lerp
from service.core.optimizers.restored import mismatch as restored_mismatch

MAX_PRECONDITIONED_DIM = 2048
"""The longest dimension optserve gives a preconditioner. A dimension of length d keeps two
d x d matrices and costs an O(d^3) ``eigh`` at its tensor's first step, then a product and
QR of that size every ``precondition_frequency`` steps, beside projections of O(d) per
entry every step. Measured on the development machine's 2 shared cores, float32, a
d x d tensor with ``precondition_frequency=1``: first step 97.7 s and then 61-69 s a step
at d = 4096, 15.1 s and then 10-11 s at 2048; the package's default
``max_precondition_dim`` (10000) would hold a step worker far longer. Shapes that would
get a longer one are refused when the group is made, naming the argument."""


@dataclass
class SOAPState:
    step: int = 0
    """The group's step count (the package's ``group['step']``)."""
    maximize: bool = False
    """The constructor's ``maximize``: the package reads it, not the group's."""
    data_format: str = "channels_first"
    """The constructor's ``data_format``, likewise."""
    started: list[bool] = field(default_factory=list)
    """Per tensor: whether its preconditioner exists (made at its first gradient)."""
    shampoo_beta: list[float] = field(default_factory=list)
    """Per tensor, fixed when it starts, as the package keeps it in the tensor's state."""
    precondition_frequency: list[int] = field(default_factory=list)
    exp_avg: list[np.ndarray] = field(default_factory=list)
    exp_avg_sq: list[np.ndarray] = field(default_factory=list)
    """The second moment, in the eigenbasis (the tensor's shape)."""
    gg: list[np.ndarray] = field(default_factory=list)
    """Shampoo's statistics of every preconditioned dimension, tensor after tensor."""
    q: list[np.ndarray] = field(default_factory=list)
    """Their orthogonal bases, aligned with ``gg``."""


def merge_small_dims(shape: Sequence[int], max_dim: int) -> list[int]:
    """The package's ``merge_small_dims``: neighbouring dimensions multiplied together
    while the product stays within ``max_dim`` (and ``[1]`` when all of them fit)."""
    merged: list[int] = []
    product = 1
    for dim in shape:
        product *= dim
        if product > max_dim:
            merged.append(product // dim)
            product = dim
    merged.append(product)
    return merged if len(merged) > 1 else [1]


@dataclass(frozen=True)
class _Layout:
    """How the package sees one tensor: the shape its projections work on, and which of
    that shape's dimensions have a preconditioner (``None``: the identity)."""

    shape: Shape
    working: Shape
    blocks: tuple[int | None, ...]
    merge: bool
    channels_last: bool

    @classmethod
    def of(cls, shape: Shape, hp: Mapping[str, Any], data_format: str) -> _Layout:
        max_dim, merge = hp["max_precondition_dim"], hp["merge_dims"]
        channels_last = data_format == "channels_last" and len(shape) == 4
        working = shape
        if merge:
            permuted = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
            working = tuple(merge_small_dims(permuted, max_dim))
        if len(shape) == 1:
            # A vector's one preconditioner, whether or not its dimensions are merged.
            fits = hp["precondition_1d"] and shape[0] <= max_dim
            blocks: tuple[int | None, ...] = (shape[0] if fits else None,)
        else:
            stats = working if merge else shape
            blocks = tuple(d if d <= max_dim else None for d in stats)
        return cls(shape, working, blocks, merge, channels_last)

    @property
    def matrices(self) -> int:
        return sum(b is not None for b in self.blocks)

    def to_working(self, a: np.ndarray) -> np.ndarray:
        if not self.merge:
            return a
        if self.channels_last:
            a = a.transpose(0, 3, 1, 2)
        return a.reshape(self.working)

    def from_working(self, a: np.ndarray) -> np.ndarray:
        if not self.merge:
            return a
        if self.channels_last:
            s = self.shape
            return a.reshape(s[0], s[3], s[1], s[2]).transpose(0, 2, 3, 1)
        return a.reshape(self.shape)


def _project(a: np.ndarray, layout: _Layout, qs: Sequence[np.ndarray], forward: bool) -> np.ndarray:
    """The package's ``project``: contract each dimension with its basis (``Q`` forward,
    ``Q^T`` backward) or move it last unchanged; the dimensions come back in order."""
    x = layout.to_working(a)
    bases = iter(qs)
    for block in layout.blocks:
        if block is None:
            x = np.moveaxis(x, 0, -1)
        else:
            x = np.tensordot(x, next(bases), axes=([0], [0 if forward else 1]))
    return np.ascontiguousarray(layout.from_working(x))


def _eigenbasis(m: np.ndarray) -> np.ndarray:
    """``torch.linalg.eigh(m + 1e-30 I)``'s eigenvectors, by descending eigenvalue."""
    regular = m + m.dtype.type(1e-30) * np.eye(m.shape[0], dtype=m.dtype)
    _, q = np.linalg.eigh(regular)
    return np.ascontiguousarray(q[:, ::-1])


class SOAP(Optimizer[SOAPState]):
    r"""pytorch_optimizer's SOAP ``step``, in its op order.

    .. math::
        G_k &\leftarrow \operatorname{lerp}(G_k, g_{(k)} g_{(k)}^T, 1 - \beta_s), \quad
        \tilde g = g \times_k Q_k \\
        m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1), \quad
        v \leftarrow \operatorname{lerp}(v, \tilde g^2, 1 - \beta_2) \\
        \theta &\leftarrow \Bigl(\theta - \eta_t
            \bigl(\tfrac{m \times_k Q_k}{\sqrt v + \epsilon}\bigr) \times_k Q_k^T\Bigr)
            (1 - \gamma\lambda)

    with :math:`\eta_t = \gamma \sqrt{1 - \beta_2^{t}} / (1 - \beta_1^{t})` under
    ``correct_bias``, :math:`t` one less than the group's step count; the first step
    only starts the statistics.
    """

    name = "SOAP"
    args = (
        Arg("lr", "float", 3e-3, "learning rate"),
        Arg("betas", "float_pair", (0.95, 0.95), "Adam's moment decay rates"),
        Arg(
            "shampoo_beta",
            "float",
            None,
            "decay of the preconditioner statistics; null: betas[1]",
            nullable=True,
        ),
        Arg("weight_decay", "float", 1e-2, "decoupled weight decay coefficient"),
        Arg("precondition_frequency", "int", 10, "steps between eigenbasis refreshes"),
        Arg("max_precondition_dim", "int", 10000, "larger dimensions are not preconditioned"),
        Arg("merge_dims", "bool", False, "merge small dimensions before preconditioning"),
        Arg("precondition_1d", "bool", False, "precondition vectors too"),
        Arg("correct_bias", "bool", True, "Adam's bias correction of the step"),
        Arg("normalize_gradient", "bool", False, "divide the step by its root mean square"),
        Arg(
            "data_format",
            "str",
            "channels_first",
            "layout of 4-D tensors for merging dimensions",
            choices=("channels_first", "channels_last"),
        ),
        Arg("eps", "float", 1e-8, "added to the denominator"),
        Arg("maximize", "bool", False, "maximize the objective instead of minimizing"),
    )
    reference = "pytorch_optimizer"
    unsupported = ()
    state_type = SOAPState
    whole_step = True

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr = hp["lr"]
        check(lr >= 0.0, f"{where}lr", f"learning rate must be positive. ({lr} > 0)", lr)
        for i, beta in enumerate(hp["betas"]):
            check(
                0.0 <= beta < 1.0,
                f"{where}betas",
                f"beta{i + 1} must be in the range [0.0, 1.0)",
                list(hp["betas"]),
            )
        for name in ("shampoo_beta", "weight_decay"):
            value = hp[name]
            check(
                value is None or value >= 0.0,
                f"{where}{name}",
                f"{name} must be non-negative",
                value,
            )
        # The package only asks for a non-negative shampoo_beta; above 1 the statistics'
        # moving average extrapolates away from the gradients' outer products.
        sb = hp["shampoo_beta"]
        check(
            sb is None or sb <= 1.0,
            f"{where}shampoo_beta",
            "shampoo_beta must be at most 1",
            sb,
        )
        for name in ("precondition_frequency", "max_precondition_dim"):
            check(hp[name] > 0, f"{where}{name}", f"{name} must be positive", hp[name])
        check(hp["eps"] >= 0.0, f"{where}eps", "eps must be non-negative", hp["eps"])

    def check_shapes(self, shapes: Sequence[Shape], hp: Mapping[str, Any]) -> None:
        for shape in shapes:
            layout = _Layout.of(tuple(shape), hp, hp["data_format"])
            largest = max((b for b in layout.blocks if b is not None), default=0)
            if largest > MAX_PRECONDITIONED_DIM:
                raise InvalidHyperparameter(
                    "max_precondition_dim",
                    f"a tensor of shape {list(shape)} would get a {largest}x{largest} "
                    f"preconditioner with max_precondition_dim={hp['max_precondition_dim']}; "
                    f"optserve preconditions dimensions of at most {MAX_PRECONDITIONED_DIM} "
                    "(each costs an eigendecomposition of that size): set "
                    f"max_precondition_dim to {MAX_PRECONDITIONED_DIM} or less, which leaves "
                    "longer dimensions unpreconditioned, as the package does",
                )
            # merge_small_dims gives [1] when every dimension fits, and the package's
            # reshape to it fails at the first step for any tensor of more than one entry.
            size = math.prod(shape)
            if hp["merge_dims"] and math.prod(layout.working) != size:
                raise InvalidHyperparameter(
                    "merge_dims",
                    f"merge_dims cannot take a tensor of shape {list(shape)} with "
                    f"max_precondition_dim={hp['max_precondition_dim']}: its {size} entries "
                    "all fit in one dimension, which the package reshapes to [1]",
                )

    def check_restored(self, restored: SOAPState, fresh: SOAPState) -> str:
        names = ("step", "maximize", "data_format", "started", "shampoo_beta")
        why = restored_mismatch(restored, fresh, (*names, "precondition_frequency"))
        if why:
            return why
        if restored.step < 0:
            return f"step {restored.step} is negative"
        if restored.data_format != fresh.data_format:
            # The statistics' shapes follow the constructor's layout.
            return f"data_format {restored.data_format!r} is not {fresh.data_format!r}"
        for i, started in enumerate(restored.started):
            beta, every = restored.shampoo_beta[i], restored.precondition_frequency[i]
            if started and not (0.0 <= beta <= 1.0 and every >= 1):
                return (
                    f"tensor {i}'s shampoo_beta {beta} or precondition_frequency {every} "
                    "is out of range"
                )
        return ""

    def grads_to_check(self, state: SOAPState) -> Sequence[int]:
        return [i for i, started in enumerate(state.started) if not started]

    def check_grad(
        self, index: int, grad: np.ndarray, state: SOAPState, hp: Mapping[str, Any]
    ) -> str:
        # A tensor's first bases are an eigh of its statistics, which fails (in the package
        # too) when they overflow. Each statistic's largest entry is on its diagonal (it is
        # a Gram matrix), the sums of squares over the other dimensions, and the
        # moving average at the start only scales it down.
        layout = _Layout.of(grad.shape, hp, state.data_format)
        x = grad if len(layout.shape) == 1 else layout.to_working(grad)
        with np.errstate(over="ignore"):  # an overflow is what is looked for
            squares = np.square(x, dtype=np.float64)
            sums = [
                squares.sum(axis=tuple(a for a in range(x.ndim) if a != axis))
                for axis, block in enumerate(layout.blocks)
                if block is not None
            ]
        limit = float(np.finfo(grad.dtype).max)
        for diagonal in sums:
            largest = float(diagonal.max(initial=0.0))
            if not largest <= limit:
                return (
                    f"overflow SOAP's statistics in {grad.dtype} (an entry of {largest:.3g}): "
                    "its first eigenbasis cannot be computed; clip the gradients"
                )
        return ""

    def extra_state_elements(self, shapes: Sequence[Shape], hp: Mapping[str, Any]) -> int:
        # Each preconditioned dimension keeps two d x d matrices: its statistic and basis.
        data_format = hp.get("constructor_data_format", hp["data_format"])
        return sum(
            2 * block * block
            for shape in shapes
            for block in _Layout.of(tuple(shape), hp, data_format).blocks
            if block is not None
        )

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        return bool(hp["weight_decay"])

    def init_hparams(
        self, group: Mapping[str, Any], constructor: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        return {
            **group,
            "constructor_maximize": constructor.get("maximize", group["maximize"]),
            "constructor_data_format": constructor.get("data_format", group["data_format"]),
        }

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> SOAPState:
        data_format = hp.get("constructor_data_format", hp["data_format"])
        state = SOAPState(
            maximize=bool(hp.get("constructor_maximize", hp["maximize"])),
            data_format=data_format,
            started=[False] * len(shapes),
            shampoo_beta=[0.0] * len(shapes),
            precondition_frequency=[0] * len(shapes),
            exp_avg=[np.zeros(s, dtype=dtype) for s in shapes],
            exp_avg_sq=[np.zeros(s, dtype=dtype) for s in shapes],
        )
        for shape in shapes:
            for block in _Layout.of(tuple(shape), hp, data_format).blocks:
                if block is not None:
                    state.gg.append(np.zeros((block, block), dtype=dtype))
                    state.q.append(np.zeros((block, block), dtype=dtype))
        return state

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: SOAPState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> SOAPState:
        return self.update_groups([grads], [state], [params], [hp], [out])[0]

    def update_groups(
        self,
        grads: Sequence[Sequence[np.ndarray | None]],
        states: Sequence[SOAPState],
        params: Sequence[Sequence[np.ndarray] | None],
        hps: Sequence[Mapping[str, Any]],
        outs: Sequence[Sequence[np.ndarray]],
    ) -> list[SOAPState]:
        for g, st, p, hp, out in zip(grads, states, params, hps, outs, strict=True):
            self._step_group(g, st, p, hp, out)
        return list(states)

    def _step_group(
        self,
        grads: Sequence[np.ndarray | None],
        st: SOAPState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> None:
        for d in out:
            d.fill(0)
        layouts = [_Layout.of(g.shape, hp, st.data_format) for g in st.exp_avg]
        offsets = np.cumsum([0, *(lay.matrices for lay in layouts)]).tolist()
        for i, g in enumerate(grads):
            if g is not None and not st.started[i]:
                # The package's init_group: the statistics start from the raw gradient, at
                # the group's step count before this step.
                st.started[i] = True
                beta2 = hp["betas"][1]
                sb = hp["shampoo_beta"]
                st.shampoo_beta[i] = float(sb if sb is not None else beta2)
                st.precondition_frequency[i] = int(hp["precondition_frequency"])
                self._precondition(g, st, i, layouts[i], offsets[i], st.step, first=True)
        st.step += 1
        if st.step == 1:
            return
        beta1, beta2 = hp["betas"]
        step = st.step - 1
        step_size = hp["lr"]
        if hp["correct_bias"]:
            step_size *= math.sqrt(1.0 - math.pow(beta2, step)) / (1.0 - math.pow(beta1, step))
        for i, g in enumerate(grads):
            if g is None:
                continue
            if st.maximize:
                g = -g
            layout, qs = layouts[i], st.q[offsets[i] : offsets[i + 1]]
            self._adam(g, st, i, layout, qs, params, hp, out[i], step_size, beta1, beta2)
            self._precondition(g, st, i, layout, offsets[i], step, first=False)

    def _adam(
        self,
        g: np.ndarray,
        st: SOAPState,
        i: int,
        layout: _Layout,
        qs: Sequence[np.ndarray],
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: np.ndarray,
        step_size: float,
        beta1: float,
        beta2: float,
    ) -> None:
        dtype = g.dtype.type
        projected = _project(g, layout, qs, forward=True)
        st.exp_avg[i] = lerp(st.exp_avg[i], g, 1.0 - beta1)
        st.exp_avg_sq[i] = lerp(st.exp_avg_sq[i], projected * projected, 1.0 - beta2)
        denom = np.sqrt(st.exp_avg_sq[i])
        denom += dtype(hp["eps"])
        # A new array: without a basis the projection is the moment itself.
        moment = _project(st.exp_avg[i], layout, qs, forward=True) / denom
        norm_grad = _project(moment, layout, qs, forward=False)
        if hp["normalize_gradient"]:
            mean_square = dtype(reductions.sum_of_squares(norm_grad)) / dtype(norm_grad.size)
            norm_grad /= np.sqrt(mean_square) + dtype(hp["eps"])
        # p.add_(norm_grad, alpha=-step_size), then p.mul_(1 - weight_decay lr).
        np.multiply(norm_grad, dtype(-step_size), out=out)
        wd = hp["weight_decay"]
        if wd != 0:
            assert params is not None, "weight decay needs parameter values"
            p = params[i]
            moved = p + out
            moved *= dtype(1.0 - wd * hp["lr"])
            np.subtract(moved, p, out=out)

    def _precondition(
        self,
        g: np.ndarray,
        st: SOAPState,
        i: int,
        layout: _Layout,
        offset: int,
        step: int,
        first: bool,
    ) -> None:
        """The package's ``update_pre_conditioner``: the statistics' moving averages, the
        first bases by ``eigh``, and a power-iteration refresh every
        ``precondition_frequency`` steps."""
        weight = 1.0 - st.shampoo_beta[i]
        x = g if len(layout.shape) == 1 else layout.to_working(g)
        k = offset
        for axis, block in enumerate(layout.blocks):
            if block is None:
                continue
            others = [a for a in range(x.ndim) if a != axis]
            outer = np.tensordot(x, x, axes=(others, others))
            st.gg[k] = lerp(st.gg[k], np.ascontiguousarray(outer, dtype=g.dtype), weight)
            k += 1
        if first:
            for j in range(offset, k):
                st.q[j] = _eigenbasis(st.gg[j])
        if step > 0 and step % st.precondition_frequency[i] == 0:
            self._refresh(st, i, layout, offset)

    def _refresh(self, st: SOAPState, i: int, layout: _Layout, offset: int) -> None:
        """The package's ``get_orthogonal_matrix_qr``: one power iteration and QR per basis,
        its columns (and the second moment's entries) ordered by the estimated eigenvalue."""
        exp_avg_sq = layout.to_working(st.exp_avg_sq[i]) if layout.merge else st.exp_avg_sq[i]
        k = offset
        for axis, block in enumerate(layout.blocks):
            if block is None:
                continue
            m, o = st.gg[k], st.q[k]
            product = m @ o
            estimate = (o * product).sum(axis=0)
            order = np.argsort(-estimate, kind="stable")
            exp_avg_sq = np.take(exp_avg_sq, order, axis=axis)
            # The package runs the QR in float32 whatever the dtype.
            q, _ = np.linalg.qr(product[:, order].astype(np.float32))
            st.q[k] = np.ascontiguousarray(q.astype(m.dtype))
            k += 1
        st.exp_avg_sq[i] = np.ascontiguousarray(layout.from_working(exp_avg_sq))


register(SOAP())

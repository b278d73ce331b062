"""L-BFGS (torch.optim.LBFGS) as a resumable ask/tell state machine.

torch's ``LBFGS.step(closure)`` calls the closure many times per step: once at the start,
then once per fixed step (``max_iter > 1``) or once per trial point of the strong-Wolfe
line search. A service cannot call back into the client, so the step is turned inside
out: every closure call becomes a suspension point. The caller *tells* the machine the
loss and gradient at the current point; the machine runs torch's control flow until the
next closure call (it *asks* for the point ``params + out``) or until ``step()`` would
return. Everything the suspended computation needs lives in :class:`LBFGSState`, a
plain record of arrays and JSON scalars, so a session can be checkpointed in the middle
of a line search and continue exactly.

All tensors of the session are one flat vector, as in torch (which allows one parameter
group only). Scalars (step lengths, directional derivatives, losses) are Python floats,
which is torch's scalar arithmetic in float64 sessions; in float32 sessions torch keeps
some of them as float32 tensors. Dot products and sums run in the fixed order of
:mod:`service.core.reductions` (so replays agree across machines), and torch
adds scaled vectors with fused multiply-adds, so the iterates equal torch's to rounding
(about 1e-13 on the test problems), not to the bit; an ill-conditioned run amplifies
that difference as it would any rounding difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import reductions
from service.core.errors import InvalidHyperparameter, InvalidInput
from service.core.hparams import Arg, check
from service.core.optimizers.base import Optimizer, Shape, register

# _strong_wolfe's own defaults. LBFGS.step() passes only max_ls, so the line search uses
# its default tolerance_change even when the optimizer's differs.
WOLFE_C1 = 1e-4
WOLFE_C2 = 0.9
WOLFE_TOLERANCE_CHANGE = 1e-9

# Where a suspended step stands: what the next loss and gradient are the value of.
START = "start"
"""The closure call that opens a step, at the current parameters."""
FIXED = "fixed"
"""The re-evaluation after a fixed step of length ``t`` (no line search)."""
LS_BRACKET = "ls_bracket"
"""A trial point of the line search's bracketing phase (the first trial included)."""
LS_ZOOM = "ls_zoom"
"""A trial point of the line search's zoom phase."""


@dataclass
class LBFGSState:
    """torch's LBFGS state plus the locals of a step suspended at a closure call."""

    # Kept across steps, as in torch's ``optimizer.state``.
    func_evals: int = 0
    n_iter: int = 0
    d: np.ndarray | None = None
    t: float | None = None
    old_dirs: list[np.ndarray] = field(default_factory=list)
    old_stps: list[np.ndarray] = field(default_factory=list)
    ro: list[float] = field(default_factory=list)
    H_diag: float = 1.0
    prev_flat_grad: np.ndarray | None = None
    prev_loss: float | None = None

    # Locals of step() while it waits for a closure value.
    phase: str = START
    orig_loss: float | None = None
    """The loss of the step's first closure call: what torch's ``step()`` returns."""
    iteration: int = 0
    """step()'s own ``n_iter``: iterations done in the current step."""
    current_evals: int = 0
    gtd: float = 0.0
    """Directional derivative at the start of the current iteration."""
    x: np.ndarray | None = None
    """torch's parameter values during a line-search step (``x_init`` of the search)."""

    # Locals of _strong_wolfe. Its f, g and gtd are prev_loss, prev_flat_grad and gtd.
    ls_max: int = 0
    ls_iter: int = 0
    ls_evals: int = 0
    d_norm: float = 0.0
    t_prev: float = 0.0
    f_prev: float = 0.0
    gtd_prev: float = 0.0
    g_prev: np.ndarray | None = None
    bracket: list[float] = field(default_factory=list)
    bracket_f: list[float] = field(default_factory=list)
    bracket_gtd: list[float] = field(default_factory=list)
    bracket_g: list[np.ndarray] = field(default_factory=list)
    low_pos: int = 0
    high_pos: int = 1
    insuf_progress: bool = False


@dataclass(frozen=True)
class TellResult:
    """What the caller does after :meth:`LBFGS.tell`."""

    evaluate: bool
    """The step goes on: evaluate loss and gradient at ``params + out`` and tell them."""
    completed: bool
    """torch's ``step()`` returned here; the next tell opens a new step at ``params + out``."""
    loss: float | None = None
    """When ``completed``: what torch's ``step()`` returns, the loss of its first closure
    call (``scheduler.step(optimizer.step(closure))`` feeds ReduceLROnPlateau this)."""


class LBFGS(Optimizer[LBFGSState]):
    r"""Limited-memory BFGS with torch's exact control flow.

    Each iteration builds the direction :math:`d = -H g` by the two-loop recursion over
    the last ``history_size`` pairs :math:`(y, s)` with :math:`y^\top s > 10^{-10}`,
    scaled by :math:`H_0 = y^\top s / y^\top y`, and moves :math:`x \leftarrow x + t d`
    with :math:`t = \min(1, 1/\|g\|_1)\,\mathrm{lr}` on the very first iteration and
    :math:`\mathrm{lr}` after, or with the strong-Wolfe line search's :math:`t`.

    Two ways to drive it:

    * ``update(grads, ...)``: ``max_iter == 1`` without a line search. One call is one
      ``LBFGS.step(closure)`` whose closure yields ``grads``; no loss is needed.
    * ``tell(loss, grads, ...)``: every other configuration (``ask_tell(hp)``). Each call
      hands over the value of one closure call, at the current parameters, and writes
      into ``out`` the move to the next point torch would evaluate (or, when the step
      completes, to torch's new parameters). The points asked for are exactly the points
      at which torch calls the closure, in the same order.

    torch validates only ``lr``; optserve also rejects ``max_iter``, ``max_eval`` and
    ``history_size`` below 1, with which torch never moves or fails inside ``step()``.
    """

    per_tensor_state = False
    name = "LBFGS"
    args = (
        Arg("lr", "float", 1.0, "learning rate"),
        Arg("max_iter", "int", 20, "maximal number of iterations per optimization step"),
        Arg(
            "max_eval",
            "int",
            None,
            "maximal number of function evaluations per step (default: max_iter * 5 // 4)",
            nullable=True,
        ),
        Arg("tolerance_grad", "float", 1e-7, "termination tolerance on first order optimality"),
        Arg(
            "tolerance_change",
            "float",
            1e-9,
            "termination tolerance on function value/parameter changes",
        ),
        Arg("history_size", "int", 100, "update history size"),
        Arg(
            "line_search_fn",
            "str",
            None,
            "either 'strong_wolfe' or null",
            nullable=True,
            choices=("strong_wolfe",),
        ),
    )
    state_type = LBFGSState
    unsupported = ()
    """torch's LBFGS takes no foreach, fused, capturable or differentiable argument."""

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        search = given.get("line_search_fn")
        if search is not None and search != "strong_wolfe":
            # torch raises this at the first step(); here the session is refused up front.
            raise InvalidHyperparameter(
                f"{where}line_search_fn", "only 'strong_wolfe' is supported", search
            )
        hp = super().resolve(given, where)
        if hp["max_eval"] is None:
            hp["max_eval"] = hp["max_iter"] * 5 // 4
        return hp

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        lr = hp["lr"]
        check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
        for name in ("max_iter", "max_eval", "history_size"):
            value = hp[name]
            if value is not None:
                check(value >= 1, f"{where}{name}", f"Invalid {name} value: {value}", value)

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        """The line search measures every trial point from the parameters it started at."""
        return hp["line_search_fn"] is not None

    def ask_tell(self, hp: Mapping[str, Any]) -> bool:
        """Whether a step needs more than the one gradient it starts with."""
        return hp["line_search_fn"] is not None or hp["max_iter"] > 1

    def init(
        self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]
    ) -> LBFGSState:
        return LBFGSState()

    def update(
        self,
        grads: Sequence[np.ndarray],
        state: LBFGSState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> LBFGSState:
        if self.ask_tell(hp):
            raise RuntimeError("LBFGS with a line search or max_iter > 1 is driven by tell()")
        result = self.tell(None, grads, state, params, hp, out)
        assert result.completed
        return state

    def tell(
        self,
        loss: float | None,
        grads: Sequence[np.ndarray],
        state: LBFGSState,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> TellResult:
        """Hand over one closure value; advance ``state`` in place; write the next move.

        ``loss`` and ``grads`` are the objective and its gradient at ``params`` (the
        point asked for last, or the current parameters when a step starts). ``out``
        receives ``next_point - params``. ``loss`` may be ``None`` only when
        ``ask_tell(hp)`` is false: torch reads it only to compare successive iterations.

        The result says whether the step goes on (``evaluate``: tell the loss and
        gradient at ``params + out`` next) or ended where torch's ``step()`` returns
        (``completed``: ``params + out`` are torch's new parameters, and the next tell is
        the opening evaluation of the next step, at those parameters). Exactly one of the
        two is true.
        """
        if loss is None and self.ask_tell(hp):
            raise InvalidInput("LBFGS with a line search or max_iter > 1 needs 'loss'", "loss")
        flat_grad = _flatten(grads)
        search = hp["line_search_fn"] is not None
        here: np.ndarray | None = None
        if search:
            if params is None:
                raise InvalidInput("LBFGS with a line search needs the parameter values", "params")
            here = _flatten(params)
        _check_state(state, hp, flat_grad)
        moves = _Moves(flat_grad.size, flat_grad.dtype, here)
        # torch's arithmetic overflows to inf and nan silently; so does the machine's.
        with np.errstate(all="ignore"):
            completed = _Machine(state, hp, moves).resume(loss, flat_grad)
        moves.write(out)
        returned = state.orig_loss if completed else None
        return TellResult(evaluate=not completed, completed=completed, loss=returned)


class _Moves:
    """Collects how far the caller must move from where it told us its values.

    Fixed steps are relative (``+ t d``, as torch adds them to the live parameters); a
    line search names absolute points ``x + t d`` measured from its start ``x``.
    """

    def __init__(self, size: int, dtype: np.dtype[Any], here: np.ndarray | None) -> None:
        self.here = here
        self.target: np.ndarray | None = None
        self.relative = np.zeros(size, dtype=dtype)

    def step(self, t: float, d: np.ndarray) -> None:
        _add_scaled_(self.relative, t, d)

    def goto(self, point: np.ndarray) -> None:
        self.target = point

    def write(self, out: Sequence[np.ndarray]) -> None:
        delta = self.relative
        if self.target is not None:
            assert self.here is not None
            delta = self.target - self.here
        offset = 0
        for o in out:
            o[...] = delta[offset : offset + o.size].reshape(o.shape)
            offset += o.size


class _Machine:
    """torch's LBFGS.step and _strong_wolfe, cut at every closure call.

    Each method is a stretch of torch's code between two closure calls; it ends by
    setting ``state.phase`` and asking for a point (returns False) or by finishing the
    step (returns True). Comments quote the torch line each branch mirrors.
    """

    def __init__(self, state: LBFGSState, hp: Mapping[str, Any], moves: _Moves) -> None:
        self.s = state
        self.hp = hp
        self.moves = moves
        self.search = hp["line_search_fn"] is not None

    def resume(self, loss: float | None, flat_grad: np.ndarray) -> bool:
        phase = self.s.phase
        if phase == START:
            return self._open(loss, flat_grad)
        if phase == FIXED:
            return self._after_fixed_eval(loss, flat_grad)
        assert loss is not None and phase in (LS_BRACKET, LS_ZOOM)
        return self._after_trial(loss, flat_grad)

    # ---- LBFGS.step ---------------------------------------------------------------

    def _open(self, loss: float | None, flat_grad: np.ndarray) -> bool:
        s = self.s
        s.orig_loss = loss
        s.current_evals = 1
        s.func_evals += 1
        if self.search:
            assert self.moves.here is not None
            s.x = self.moves.here.copy()
        # opt_cond = flat_grad.abs().max() <= tolerance_grad; if opt_cond: return
        if _abs_max(flat_grad) <= self.hp["tolerance_grad"]:
            return self._finish()
        s.iteration = 0
        return self._iterate(loss, flat_grad)

    def _iterate(self, loss: float | None, flat_grad: np.ndarray) -> bool:
        """The body of ``while n_iter < max_iter``, up to the next closure call.

        The loop condition itself never fails: ``max_iter >= 1``, and ``_checks`` stops
        on ``n_iter == max_iter`` before coming back here.
        """
        s, hp = self.s, self.hp
        s.iteration += 1
        s.n_iter += 1
        self._direction(flat_grad)
        assert s.d is not None
        s.prev_flat_grad = flat_grad
        s.prev_loss = loss
        # The first iteration ever scales lr down by the gradient's l1 norm.
        first = s.n_iter == 1
        t = min(1.0, _div(1.0, _abs_sum(flat_grad))) * hp["lr"] if first else hp["lr"]
        s.t = t
        s.gtd = _dot(flat_grad, s.d)
        # if gtd > -tolerance_change: break
        if s.gtd > -hp["tolerance_change"]:
            return self._finish()
        if self.search:
            return self._wolfe_start()
        self.moves.step(t, s.d)
        if s.iteration != hp["max_iter"]:
            s.phase = FIXED
            return False
        # The last iteration is not re-evaluated; it ends on `n_iter == max_iter`.
        return self._finish()

    def _direction(self, flat_grad: np.ndarray) -> None:
        """``d``: steepest descent first, then the two-loop L-BFGS recursion."""
        s = self.s
        if s.n_iter == 1:
            s.d = -flat_grad
            s.old_dirs, s.old_stps, s.ro = [], [], []
            s.H_diag = 1.0
            return
        assert s.d is not None and s.t is not None and s.prev_flat_grad is not None
        y = flat_grad - s.prev_flat_grad
        step = s.d * s.t
        ys = _dot(y, step)
        if ys > 1e-10:
            if len(s.old_dirs) == self.hp["history_size"]:
                del s.old_dirs[0], s.old_stps[0], s.ro[0]
            s.old_dirs.append(y)
            s.old_stps.append(step)
            s.ro.append(1.0 / ys)
            s.H_diag = _div(ys, _dot(y, y))
        count = len(s.old_dirs)
        al = [0.0] * count
        q = -flat_grad
        for i in range(count - 1, -1, -1):
            al[i] = _dot(s.old_stps[i], q) * s.ro[i]
            _add_scaled_(q, -al[i], s.old_dirs[i])
        r = q * s.H_diag
        for i in range(count):
            be_i = _dot(s.old_dirs[i], r) * s.ro[i]
            _add_scaled_(r, al[i] - be_i, s.old_stps[i])
        s.d = r

    def _after_fixed_eval(self, loss: float | None, flat_grad: np.ndarray) -> bool:
        opt_cond = _abs_max(flat_grad) <= self.hp["tolerance_grad"]
        return self._checks(loss, flat_grad, opt_cond, 1)

    def _after_line_search(self, loss: float, flat_grad: np.ndarray, t: float) -> bool:
        s = self.s
        assert s.x is not None and s.d is not None
        s.t = t
        # self._add_grad(t, d), from x_init: the parameters move to the accepted point.
        s.x = _add_scaled(s.x, t, s.d)
        opt_cond = _abs_max(flat_grad) <= self.hp["tolerance_grad"]
        return self._checks(loss, flat_grad, opt_cond, s.ls_evals)

    def _checks(
        self, loss: float | None, flat_grad: np.ndarray, opt_cond: bool, evals: int
    ) -> bool:
        """The bottom of the iteration: count evaluations, test every stopping rule."""
        s, hp = self.s, self.hp
        assert s.d is not None and s.t is not None
        s.current_evals += evals
        s.func_evals += evals
        if s.iteration == hp["max_iter"] or s.current_evals >= hp["max_eval"] or opt_cond:
            return self._finish()
        # lack of progress: d.mul(t).abs().max() <= tolerance_change
        if _abs_max(s.d * s.t) <= hp["tolerance_change"]:
            return self._finish()
        assert loss is not None and s.prev_loss is not None
        if abs(loss - s.prev_loss) < hp["tolerance_change"]:
            return self._finish()
        return self._iterate(loss, flat_grad)

    def _finish(self) -> bool:
        """step() returns: torch's parameters are final; drop the line-search locals."""
        s = self.s
        if self.search:
            assert s.x is not None
            self.moves.goto(s.x)
        s.phase = START
        s.iteration = 0
        s.current_evals = 0
        s.x = None
        s.g_prev = None
        s.bracket, s.bracket_f, s.bracket_gtd, s.bracket_g = [], [], [], []
        return True

    # ---- _strong_wolfe ------------------------------------------------------------

    def _ask(self, phase: str) -> bool:
        """obj_func(x, t, d): the closure at ``x + t d``."""
        s = self.s
        assert s.x is not None and s.d is not None and s.t is not None
        s.phase = phase
        self.moves.goto(_add_scaled(s.x, s.t, s.d))
        return False

    def _wolfe_start(self) -> bool:
        s = self.s
        assert s.d is not None and s.prev_flat_grad is not None and s.prev_loss is not None
        s.d_norm = _abs_max(s.d)
        s.ls_max = self.hp["max_eval"] - s.current_evals
        s.ls_evals = 0
        s.ls_iter = 0
        s.t_prev, s.f_prev, s.g_prev, s.gtd_prev = 0.0, s.prev_loss, s.prev_flat_grad, s.gtd
        return self._ask(LS_BRACKET)

    def _after_trial(self, f_new: float, g_new: np.ndarray) -> bool:
        s = self.s
        assert s.d is not None
        s.ls_evals += 1
        gtd_new = _dot(g_new, s.d)
        if s.phase == LS_BRACKET:
            # The first trial is counted before the loop, every later one at its end.
            if s.ls_evals > 1:
                s.ls_iter += 1
            return self._bracket(f_new, g_new, gtd_new)
        s.ls_iter += 1
        return self._zoom_update(f_new, g_new, gtd_new)

    def _bracket(self, f_new: float, g_new: np.ndarray, gtd_new: float) -> bool:
        """One pass of the bracketing loop with the value at ``t`` just told."""
        s = self.s
        f, gtd, t = s.prev_loss, s.gtd, s.t
        assert f is not None and t is not None and s.g_prev is not None
        if s.ls_iter >= s.ls_max:
            # reached max number of iterations: bracket = [0, t]
            assert s.prev_flat_grad is not None
            s.bracket, s.bracket_f, s.bracket_g = [0.0, t], [f, f_new], [s.prev_flat_grad, g_new]
            return self._zoom_start(done=False)
        if f_new > f + WOLFE_C1 * t * gtd or (s.ls_iter > 1 and f_new >= s.f_prev):
            self._set_bracket(t, f_new, g_new, gtd_new)
            return self._zoom_start(done=False)
        if abs(gtd_new) <= -WOLFE_C2 * gtd:
            s.bracket, s.bracket_f, s.bracket_g = [t], [f_new], [g_new]
            return self._zoom_start(done=True)
        if gtd_new >= 0:
            self._set_bracket(t, f_new, g_new, gtd_new)
            return self._zoom_start(done=False)
        # interpolate, within [t + 0.01 (t - t_prev), 10 t]
        min_step = t + 0.01 * (t - s.t_prev)
        max_step = t * 10
        s.t = _cubic_interpolate(
            s.t_prev, s.f_prev, s.gtd_prev, t, f_new, gtd_new, (min_step, max_step)
        )
        s.t_prev, s.f_prev, s.g_prev, s.gtd_prev = t, f_new, g_new, gtd_new
        return self._ask(LS_BRACKET)

    def _set_bracket(self, t: float, f_new: float, g_new: np.ndarray, gtd_new: float) -> None:
        s = self.s
        assert s.g_prev is not None
        s.bracket = [s.t_prev, t]
        s.bracket_f = [s.f_prev, f_new]
        s.bracket_g = [s.g_prev, g_new]
        s.bracket_gtd = [s.gtd_prev, gtd_new]

    def _zoom_start(self, done: bool) -> bool:
        s = self.s
        s.g_prev = None
        s.insuf_progress = False
        s.low_pos, s.high_pos = (0, 1) if s.bracket_f[0] <= s.bracket_f[-1] else (1, 0)
        if done:
            return self._wolfe_return()
        return self._zoom()

    def _zoom(self) -> bool:
        """The top of the zoom loop: stop, or pick the next trial point in the bracket."""
        s = self.s
        if s.ls_iter >= s.ls_max:
            return self._wolfe_return()
        bracket = s.bracket
        # line-search bracket is so small
        if abs(bracket[1] - bracket[0]) * s.d_norm < WOLFE_TOLERANCE_CHANGE:
            return self._wolfe_return()
        t = _cubic_interpolate(
            bracket[0],
            s.bracket_f[0],
            s.bracket_gtd[0],
            bracket[1],
            s.bracket_f[1],
            s.bracket_gtd[1],
        )
        # Too close to an edge twice in a row (or on it): move 0.1 of the width inside.
        hi, lo = max(bracket), min(bracket)
        eps = 0.1 * (hi - lo)
        if min(hi - t, t - lo) < eps:
            if s.insuf_progress or t >= hi or t <= lo:
                t = hi - eps if abs(t - hi) < abs(t - lo) else lo + eps
                s.insuf_progress = False
            else:
                s.insuf_progress = True
        else:
            s.insuf_progress = False
        s.t = t
        return self._ask(LS_ZOOM)

    def _zoom_update(self, f_new: float, g_new: np.ndarray, gtd_new: float) -> bool:
        s = self.s
        f, gtd, t = s.prev_loss, s.gtd, s.t
        assert f is not None and t is not None
        low, high = s.low_pos, s.high_pos
        if f_new > f + WOLFE_C1 * t * gtd or f_new >= s.bracket_f[low]:
            # Armijo condition not satisfied or not lower than lowest point
            self._replace(high, t, f_new, g_new, gtd_new)
            s.low_pos, s.high_pos = (0, 1) if s.bracket_f[0] <= s.bracket_f[1] else (1, 0)
            return self._zoom()
        done = abs(gtd_new) <= -WOLFE_C2 * gtd
        if not done and gtd_new * (s.bracket[high] - s.bracket[low]) >= 0:
            # old high becomes new low
            self._replace(
                high, s.bracket[low], s.bracket_f[low], s.bracket_g[low], s.bracket_gtd[low]
            )
        # new point becomes new low
        self._replace(low, t, f_new, g_new, gtd_new)
        if done:
            return self._wolfe_return()
        return self._zoom()

    def _replace(self, pos: int, t: float, f: float, g: np.ndarray, gtd: float) -> None:
        s = self.s
        s.bracket[pos], s.bracket_f[pos], s.bracket_g[pos], s.bracket_gtd[pos] = t, f, g, gtd

    def _wolfe_return(self) -> bool:
        s = self.s
        low = s.low_pos
        return self._after_line_search(s.bracket_f[low], s.bracket_g[low], s.bracket[low])


_INTS = ("func_evals", "n_iter", "iteration", "current_evals", "ls_max", "ls_iter", "ls_evals")
_FLOATS = ("H_diag", "gtd", "d_norm", "t_prev", "f_prev", "gtd_prev")
_VECTORS = ("d", "prev_flat_grad", "x", "g_prev")
_VECTOR_LISTS = ("old_dirs", "old_stps", "bracket_g")
_FLOAT_LISTS = ("ro", "bracket", "bracket_f", "bracket_gtd")
_NEEDED = {
    START: (),
    FIXED: ("d", "t", "prev_loss"),
    LS_BRACKET: ("d", "t", "prev_loss", "prev_flat_grad", "x", "g_prev"),
    LS_ZOOM: ("d", "t", "prev_loss", "prev_flat_grad", "x"),
}


def _check_state(state: LBFGSState, hp: Mapping[str, Any], flat_grad: np.ndarray) -> None:
    """Refuse a state that could not have come from this machine (a forged checkpoint).

    Runs before anything is mutated, so a refused tell changes nothing.
    """

    def corrupt(why: str) -> InvalidInput:
        return InvalidInput(f"corrupt LBFGS state: {why}", "state")

    def is_vector(a: Any) -> bool:
        return (
            isinstance(a, np.ndarray) and a.shape == flat_grad.shape and a.dtype == flat_grad.dtype
        )

    search = hp["line_search_fn"] is not None
    phase = state.phase
    if (
        phase not in _NEEDED
        or (phase == FIXED and search)
        or (phase.startswith("ls_") and not search)
    ):
        raise corrupt(f"phase {phase!r} does not fit this configuration")
    for name in _INTS:
        value = getattr(state, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise corrupt(f"{name} must be a non-negative integer")
    numbers = [getattr(state, name) for name in _FLOATS]
    numbers += [v for name in _FLOAT_LISTS for v in getattr(state, name)]
    numbers += [v for v in (state.t, state.prev_loss, state.orig_loss) if v is not None]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise corrupt("a scalar field is not a number")
    vectors = [getattr(state, name) for name in _VECTORS]
    vectors += [v for name in _VECTOR_LISTS for v in getattr(state, name)]
    if not all(v is None or is_vector(v) for v in vectors):
        raise corrupt(f"arrays must be flat {flat_grad.dtype} vectors of {flat_grad.size}")
    needed = _NEEDED[phase] + (("d", "t", "prev_flat_grad") if state.n_iter else ())
    missing = [name for name in needed if getattr(state, name) is None]
    if missing:
        raise corrupt(f"{', '.join(missing)} missing in phase {phase!r}")
    history = len(state.old_dirs)
    if not (len(state.old_stps) == len(state.ro) == history <= hp["history_size"]):
        raise corrupt("history lists disagree in length")
    brackets = {len(state.bracket), len(state.bracket_f), len(state.bracket_g)}
    if phase == LS_ZOOM and (
        brackets != {2} or len(state.bracket_gtd) != 2 or {state.low_pos, state.high_pos} != {0, 1}
    ):
        raise corrupt("the zoom phase needs a two-point bracket")


def _cubic_interpolate(
    x1: float,
    f1: float,
    g1: float,
    x2: float,
    f2: float,
    g2: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Minimizer of the cubic through two points with values and slopes (torch's port)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * _div(f1 - f2, x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = math.sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * _div(g2 + d2 - d1, g2 - g1 + 2 * d2)
        else:
            min_pos = x1 - (x1 - x2) * _div(g1 + d2 - d1, g1 - g2 + 2 * d2)
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


def _div(a: float, b: float) -> float:
    """IEEE division: torch divides 0-d tensors, which give inf or nan instead of raising."""
    if b != 0:
        return a / b
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a.dot(b)``: a scalar of the vectors' dtype, summed in a machine-independent order."""
    return float(a.dtype.type(reductions.dot(a, b)))


def _abs_sum(a: np.ndarray) -> float:
    """``a.abs().sum()``, like :func:`_dot`."""
    return float(a.dtype.type(reductions.abs_total(a)))


def _add_scaled(a: np.ndarray, alpha: float, b: np.ndarray) -> np.ndarray:
    """``a + alpha * b`` as a new array (torch's ``a.add(b, alpha=alpha)``)."""
    return a + alpha * b


def _add_scaled_(a: np.ndarray, alpha: float, b: np.ndarray) -> None:
    """``a += alpha * b`` (torch's ``a.add_(b, alpha=alpha)``)."""
    a += alpha * b


def _abs_max(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def _flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One fresh flat vector, as torch's _gather_flat_grad (never aliases the input)."""
    return np.concatenate([np.ravel(a) for a in arrays])


register(LBFGS())

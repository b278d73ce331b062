"""What an optimizer is in optserve: declared hyperparameters plus an (init, update) pair.

An optimizer works on one parameter group (like a ``torch.optim`` param group): a list
of tensors sharing hyperparameters. ``init`` builds its state record, ``update`` reads
gradients (and parameters when the rule needs them), advances the state in place and
writes each tensor's delta ``new_param - old_param`` into caller-owned buffers.

``hp`` is the group's resolved hyperparameter dict including ``lr``; schedules rewrite
``lr`` (and ``momentum`` or ``betas`` for cyclic schedules) between steps exactly as
torch's schedulers rewrite ``param_groups``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from service.core.errors import UnknownName
from service.core.hparams import Arg, resolve

S = TypeVar("S")

Shape = tuple[int, ...]


class Optimizer(ABC, Generic[S]):
    """Base of every optimizer definition. Subclasses are stateless singletons."""

    name: ClassVar[str]
    """torch's class name, e.g. ``"AdamW"``."""
    args: ClassVar[tuple[Arg, ...]]
    """Constructor arguments in torch's order, with torch's defaults."""
    state_type: ClassVar[type[Any]]
    """The dataclass ``init`` returns, for rebuilding state from a checkpoint."""
    per_tensor_state: ClassVar[bool] = True
    """Whether the state is kept per tensor, as torch keeps it per parameter, so that a
    tensor without a gradient can be left out of a step. False for rules that keep one
    state over all of a group's tensors (LBFGS)."""
    unsupported: ClassVar[tuple[str, ...]] = ("foreach", "fused", "capturable", "differentiable")
    """torch arguments accepted where torch takes them, and ignored: they pick torch kernels."""
    reference: ClassVar[str | None] = None
    """The PyPI package whose numbers an optimizer torch lacks follows (``"lion-pytorch"``);
    ``None`` for torch.optim's classes."""
    whole_step: ClassVar[bool] = False
    """Whether the rule takes a whole step in one :meth:`update_groups` call: every group,
    a missing gradient seen as ``None`` (the rule leaves that tensor alone itself). For
    rules whose groups share numbers (Prodigy's d estimate sums over every group), and
    for rules with a group step count that advances whichever tensors have a gradient
    while each tensor's state starts at its own first one (SOAP)."""
    constructor_state_args: ClassVar[tuple[str, ...]] = ()
    """Arguments torch's constructor reads when it builds every group's state (Adagrad's
    ``initial_accumulator_value``): the constructor's value applies to every group, and a
    group's override of it is kept in the group but never read, as in torch."""

    def init_hparams(
        self, group: Mapping[str, Any], constructor: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """The hyperparameters ``init`` reads for ``group``: its own, but the constructor's
        for :attr:`constructor_state_args`."""
        if not self.constructor_state_args:
            return group
        return {**group, **{k: constructor[k] for k in self.constructor_state_args}}

    def resolve(self, given: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Defaults filled in, types checked, ranges validated with torch's messages."""
        given = dict(given)
        for name in self.unsupported:
            given.pop(name, None)
        hp = resolve(self.args, given, where=where)
        self.validate(hp, where)
        return hp

    def validate(self, hp: Mapping[str, Any], where: str = "") -> None:
        """Range checks; override with torch's checks and messages."""

    def needs_params(self, hp: Mapping[str, Any]) -> bool:
        """Whether ``update`` reads parameter values (any weight decay, by default)."""
        return bool(hp.get("weight_decay", 0.0))

    def list_members(self, field: str, shapes: Sequence[Shape]) -> list[int]:
        """Which tensors of the group a list-of-arrays state field has entries for, in order.

        Every tensor by default; a rule that keeps some state only for some tensors (Adafactor's
        factored moments) says which, so a partial step can split and merge its state.
        """
        return list(range(len(shapes)))

    def check_shapes(self, shapes: Sequence[Shape], hp: Mapping[str, Any]) -> None:
        """Reject tensor shapes the rule cannot handle with the group's hyperparameters
        ``hp`` (Muon: 2-D only)."""

    def check_restored(self, restored: S, fresh: S) -> str:
        """Why a checkpoint's record for a group cannot be stepped (a scalar of another type,
        length or range than the rule keeps), or ``""``; ``fresh`` is :meth:`init`'s record
        for the same tensors. Nothing is checked by default."""
        return ""

    def grads_to_check(self, state: S) -> Sequence[int]:
        """The group's tensors whose next gradient :meth:`check_grad` must see before the
        step is taken (none by default): a step is checked before it is recorded, so a
        rule that would fail on a finite gradient must say so then, not midway."""
        return ()

    def check_grad(self, index: int, grad: np.ndarray, state: S, hp: Mapping[str, Any]) -> str:
        """Why the rule cannot take ``grad`` (as clipping leaves it) for tensor ``index``
        of the group, or ``""`` when it can; asked only for :meth:`grads_to_check`."""
        return ""

    def extra_state_elements(self, shapes: Sequence[Shape], hp: Mapping[str, Any]) -> int:
        """State entries that do not grow with the parameters but faster (SOAP's ``d x d``
        bases): a session's element limit counts them beside the parameters, since they
        can outweigh them by orders of magnitude. The parameter-shaped moments every rule
        keeps are not counted, as for every other optimizer."""
        return 0

    @abstractmethod
    def init(self, shapes: Sequence[Shape], hp: Mapping[str, Any], dtype: np.dtype[Any]) -> S:
        """Fresh state for a group of tensors with these shapes."""

    @abstractmethod
    def update(
        self,
        grads: Sequence[np.ndarray],
        state: S,
        params: Sequence[np.ndarray] | None,
        hp: Mapping[str, Any],
        out: Sequence[np.ndarray],
    ) -> S:
        """One step: advance ``state`` in place, write deltas into ``out``, return the state.

        ``grads`` are read-only. ``params`` is ``None`` when ``needs_params`` is false.
        """

    def check_groups(self, hps: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> None:
        """Refuse groups the rule cannot step together, before anything changes (Prodigy:
        unequal non-zero lrs), naming the argument under the group's ``fields`` prefix.
        Checked when a session is made and before every step, since schedules and edits
        change the groups' hyperparameters between steps."""

    def update_groups(
        self,
        grads: Sequence[Sequence[np.ndarray | None]],
        states: Sequence[S],
        params: Sequence[Sequence[np.ndarray] | None],
        hps: Sequence[Mapping[str, Any]],
        outs: Sequence[Sequence[np.ndarray]],
    ) -> list[S]:
        """One step of every group at once, for :attr:`whole_step` rules; the
        arguments are :meth:`update`'s, one entry per group."""
        raise NotImplementedError(f"{self.name} steps its groups one by one")

    def evaluation_point(
        self, state: S, params: Sequence[np.ndarray], hp: Mapping[str, Any]
    ) -> list[np.ndarray]:
        """The point to evaluate the model at, as new arrays: the parameters themselves,
        but for rules whose parameters hold a point they only take gradients at
        (schedule-free: the package's ``eval()`` mode)."""
        return [p.copy() for p in params]

    def describe(self) -> dict[str, Any]:
        """Catalog entry: name and every argument with type and default."""
        entry: dict[str, Any] = {
            "name": self.name,
            "args": [a.describe() for a in self.args],
            # Whether a param group may name it as its own optimizer, beside other groups'
            # (``param_groups[i].optimizer``): every rule but those keeping one state over all
            # of a session's tensors.
            "group_optimizer": self.per_tensor_state,
        }
        if self.reference is not None:
            entry["reference"] = self.reference
        return entry


_REGISTRY: dict[str, Optimizer[Any]] = {}


def register(optimizer: Optimizer[Any]) -> Optimizer[Any]:
    _REGISTRY[optimizer.name.lower()] = optimizer
    return optimizer


def get(name: str) -> Optimizer[Any]:
    """Look up an optimizer by torch's class name, case-insensitively."""
    opt = _REGISTRY.get(name.lower())
    if opt is None:
        raise UnknownName("optimizer", name, sorted(o.name for o in _REGISTRY.values()))
    return opt


def all_optimizers() -> list[Optimizer[Any]]:
    return sorted(_REGISTRY.values(), key=lambda o: o.name)

"""torch's device arguments (foreach, fused, capturable, differentiable): accepted and
ignored exactly where torch's constructor takes them, refused as unknown elsewhere."""

from __future__ import annotations

import importlib.util
import inspect

import pytest

from service.core import optimizers
from service.core.errors import InvalidHyperparameter
from service.core.optimizers.base import Optimizer
from tests.core.reference_classes import PACKAGES, available, reference_class

HAVE_TORCH = importlib.util.find_spec("torch") is not None
DEVICE_ARGS = ("foreach", "fused", "capturable", "differentiable")
ALL = optimizers.all_optimizers()
TORCH_CLASSES = [o for o in ALL if o.describe().get("family") != "flower"]
FLOWER = [o for o in ALL if o.describe().get("family") == "flower"]


def _ids(found: list[Optimizer[object]]) -> list[str]:
    return [o.name for o in found]


@pytest.mark.skipif(not HAVE_TORCH, reason="reads torch's constructor signatures")
@pytest.mark.parametrize("optimizer", TORCH_CLASSES, ids=_ids(TORCH_CLASSES))
def test_ignored_arguments_are_the_device_arguments_torch_takes(
    optimizer: Optimizer[object],
) -> None:
    if not available(optimizer.name):
        pytest.skip("the reference package is not installed")
    signature = inspect.signature(reference_class(optimizer.name).__init__)
    taken = {name for name in signature.parameters if name in DEVICE_ARGS}
    if optimizer.name.lower() in PACKAGES:
        # A package's own kernel switches (lion-pytorch's use_triton) are ignored too.
        taken |= {name for name in signature.parameters if name in optimizer.unsupported}
    assert set(optimizer.unsupported) == taken


@pytest.mark.parametrize("optimizer", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("argument", DEVICE_ARGS)
def test_a_device_argument_is_ignored_where_taken_and_refused_elsewhere(
    optimizer: Optimizer[object], argument: str
) -> None:
    if argument in optimizer.unsupported:
        assert optimizer.resolve({argument: False}) == optimizer.resolve({})
    else:
        with pytest.raises(InvalidHyperparameter, match=f"unknown argument {argument};"):
            optimizer.resolve({argument: False})


@pytest.mark.parametrize("optimizer", FLOWER, ids=_ids(FLOWER))
def test_flower_strategies_take_no_device_argument(optimizer: Optimizer[object]) -> None:
    assert optimizer.unsupported == ()

"""Every optimizer of torch.optim (but SparseAdam), registered by torch's class name.

Importing this package imports each module in it, and each module registers its
optimizer, so adding an optimizer is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from service.core.optimizers.base import Optimizer, all_optimizers, get

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Optimizer", "all_optimizers", "get"]

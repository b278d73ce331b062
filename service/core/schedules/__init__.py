"""Every torch.optim.lr_scheduler class but LambdaLR and MultiplicativeLR, by torch's name.

Importing this package imports each module in it, and each module registers its
schedule, so adding a schedule is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from service.core.schedules.base import Schedule, all_schedules, get

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Schedule", "all_schedules", "get"]

"""Where each optimizer's reference lives: torch.optim, or the package that defines it.

The optimizers torch lacks are checked against their own packages (a test extra); where
a package is not installed, its cases fall back to the committed golden fixtures.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

PACKAGES: dict[str, tuple[str, str]] = {
    "lion": ("lion_pytorch", "Lion"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "came": ("came_pytorch", "CAME"),
    "soap": ("pytorch_optimizer", "SOAP"),
}
"""optserve's name (lower case) -> (module, class) of the reference package."""


def available(name: str) -> bool:
    """Whether the reference of optimizer ``name`` can be imported here."""
    module = PACKAGES.get(name.lower(), ("torch", ""))[0]
    return importlib.util.find_spec(module) is not None


def config_available(config: dict[str, Any]) -> bool:
    """Whether every optimizer a session config names has its reference here."""
    names = [config["optimizer"]["name"]]
    names += [g["optimizer"]["name"] for g in config.get("param_groups") or [] if "optimizer" in g]
    return all(available(n) for n in names)


def reference_class(name: str) -> Any:
    """The reference optimizer class for ``name`` (case-insensitive)."""
    if name.lower() in PACKAGES:
        module, cls = PACKAGES[name.lower()]
        return getattr(importlib.import_module(module), cls)
    import torch

    for attr in dir(torch.optim):
        if attr.lower() == name.lower():
            return getattr(torch.optim, attr)
    raise KeyError(name)

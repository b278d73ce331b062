"""The arguments Adam, AdamW, Adamax, NAdam and RAdam share: declarations and torch's checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.core.hparams import Arg, check


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
    lr, eps, (beta1, beta2), wd = hp["lr"], hp["eps"], hp["betas"], hp["weight_decay"]
    check(lr >= 0.0, f"{where}lr", f"Invalid learning rate: {lr}", lr)
    check(eps >= 0.0, f"{where}eps", f"Invalid epsilon value: {eps}", eps)
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
    check(wd >= 0.0, f"{where}weight_decay", f"Invalid weight_decay value: {wd}", wd)

"""The errors core raises. The API maps them to problem documents in one place."""

from __future__ import annotations

from typing import Any


class CoreError(ValueError):
    """Base for every error core raises on bad configuration or input."""


class InvalidHyperparameter(CoreError):
    """A hyperparameter is missing, unknown, of the wrong type or out of range.

    ``argument`` names the offending field (``"betas"``, ``"schedulers[1].gamma"``) so an
    HTTP layer can point at it; the message follows torch's wording where torch has one.
    """

    def __init__(self, argument: str, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.argument = argument
        self.value = value


class UnknownArguments(InvalidHyperparameter):
    """Names an optimizer or schedule does not take: every one of them, each with its field
    path, its closest known name if one is close, and what is taken instead; so a config
    with two typos is fixed in one round."""

    def __init__(
        self, unknown: list[tuple[str, str | None]], known: list[str], value: Any = None
    ) -> None:
        takes = f"expected one of {', '.join(known)}"
        named = [field + (f" (did you mean {close}?)" if close else "") for field, close in unknown]
        plural = "s" if len(unknown) > 1 else ""
        message = f"unknown argument{plural} {', '.join(named)}; {takes}"
        super().__init__(unknown[0][0], message, value)  # the value given for the first
        self.errors = [
            (field, f"unknown argument {name}; {takes}")
            for (field, _), name in zip(unknown, named, strict=True)
        ]


class UnknownName(CoreError):
    """An optimizer or schedule name that optserve does not provide."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(known)}")
        self.kind = kind
        self.name = name


class InvalidInput(CoreError):
    """Gradients, parameters or a checkpoint that do not fit the state (shape, finiteness)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

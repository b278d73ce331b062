"""Errors the codecs raise. Every malformed input ends in one of these, never anything else."""

from __future__ import annotations


class CodecError(ValueError):
    """Base of every codec error."""


class MalformedBody(CodecError):
    """The bytes or JSON values do not form a valid tensor payload."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidValues(CodecError):
    """Well-formed input whose values cannot be a tensor (strings, ragged lists, bad shape)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TooManyTensors(MalformedBody):
    """A payload names more tensors than the caller allows."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"payload holds {count} tensors, at most {limit} are allowed")
        self.count = count
        self.limit = limit

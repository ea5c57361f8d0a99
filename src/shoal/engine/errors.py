"""Errors the engine raises. Each names what is wrong so a person can act on it."""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error shoal raises on purpose."""


class ModelLoadError(ShoalError):
    """The model path is missing, unreadable, truncated or corrupt."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or tensor format is one the engine does not implement."""


class InvalidRequestError(ShoalError, ValueError):
    """A request's input or sampling parameters are invalid; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""


class EngineDeadError(ShoalError):
    """The engine can no longer serve any request (as opposed to one request failing)."""

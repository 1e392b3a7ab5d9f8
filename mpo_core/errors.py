"""Exceptions that callers (the HTTP layer, the CLI, tests) map to user-facing errors.

Every error caused by user input names the offending parameter so that the server can
answer with a 4xx whose body says which field to fix.
"""

from __future__ import annotations


class MPOError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidParameter(MPOError, ValueError):
    """A request or call parameter is invalid; ``param`` names it (dotted for nested fields)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class ConfigError(MPOError, ValueError):
    """The policy-set description cannot be loaded; the message names the culprit."""


class UnknownProfile(MPOError, KeyError):
    """A weight profile that does not exist was named."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"profile {self.name!r} does not exist"


class Overloaded(MPOError):
    """Running and queued sequences are at their limits; retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationFailed(MPOError):
    """One request could not be decoded (its stream raises this); the engine goes on."""


class BackendLost(MPOError):
    """The backend can no longer run the family (a worker rank died or stopped answering):
    the engine fails what is in flight and stops; /health turns unhealthy."""


class EngineNotRunning(MPOError):
    """The engine loop is not started, is shutting down or has died."""

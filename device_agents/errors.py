"""The one exception type the device agent raises: :class:`AgentError` and its kinds.

An app embedding the agent catches ``AgentError``; the agent never lets another exception
escape from a bad artifact or a bad request::

    AgentError
    ├── ArtifactError       the artifact cannot be loaded (corrupt, unknown format, no runtime)
    ├── IntegrityError      the artifact's SHA-256 or size does not match its manifest entry
    ├── InputMismatchError  a request's shape or dtype does not fit the model
    └── InstallError        a new model version failed its smoke test (the old one stays)
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the device agent raises on purpose."""

    exit_code = 1


class ArtifactError(AgentError):
    """The artifact cannot be loaded or run."""


class IntegrityError(AgentError):
    """The artifact does not match the hash or size its manifest records."""

    def __init__(self, message: str, *, expected: str, actual: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class InputMismatchError(AgentError):
    """The input's shape or dtype does not fit the model."""

    exit_code = 2


class InstallError(AgentError):
    """A new model version failed to install; the previous version is still active."""

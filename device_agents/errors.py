"""The one exception type the device agent raises: :class:`AgentError` and its kinds.

An app embedding the agent catches ``AgentError``; the agent never lets another exception
escape from a bad artifact or a bad request::

    AgentError                  exit code 1 (see device_agents.exit_codes)
    ├── ArtifactError       the artifact cannot be loaded (corrupt, unknown format, no runtime)
    ├── IntegrityError      the artifact's SHA-256 or size does not match its manifest entry
    ├── InputMismatchError  a request's shape or dtype does not fit the model (exit code 2)
    ├── TrainingError       local training diverged at every learning rate tried (the weights are left as
    │                       they were)
    ├── StatsError          a serving-statistics window (spool file or message) is not what it says
    └── InstallError        a new model version failed its smoke test (the old one stays)
        └── ReleaseError    a release was refused: unsigned, bad signature, expired, altered, or not
                            newer than the installed one (the old one stays)
"""

from __future__ import annotations

from device_agents.exit_codes import ExitCode


def first_line(exc: BaseException, *, prefer: str | None = None, limit: int = 300) -> str:
    """The first non-empty line of ``exc``'s message (or its type name), at most ``limit`` characters.

    ``prefer``: return the first line containing this text (case-insensitive) when there is one;
    converters print long logs whose telling line is not the first.

    >>> first_line(ValueError("bad shape\\nmore detail"))
    'bad shape'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if prefer is not None:
        lines = [line for line in lines if prefer.lower() in line.lower()] or lines
    return (lines[0] if lines else type(exc).__name__)[:limit]


class AgentError(Exception):
    """Base of every error the device agent raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


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

    exit_code = ExitCode.BAD_INPUT


class TrainingError(AgentError):
    """Local training diverged at every learning rate tried; the weights are left as they were."""


class StatsError(AgentError):
    """A serving-statistics window (:mod:`device_agents.serving.stats`) with wrong names, sizes or numbers."""


class InstallError(AgentError):
    """A new model version failed to install; the previous version is still active."""


class ReleaseError(InstallError):
    """A release was refused: unsigned, not signed by the trusted key, expired, altered, or a downgrade."""

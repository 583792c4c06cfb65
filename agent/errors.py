"""The error tree of syncagent.

::

    SyncAgentError
    ├── ConfigError(errors=[ConfigIssue(file, key, reason)])   exit 2; the process stops
    ├── RetryableError                                         back off and try again
    │   └── RateLimited(retry_after)                           obey the server's wait
    │       └── BudgetExhausted                                our own API budget: defer, visibly
    ├── PermanentError                                         stops that connector's jobs
    │   ├── AuthError                                          credentials refused
    │   └── CursorUnavailable                                  the source cannot serve the position
    └── DataError(record, field, reason)                       one record: the exception queue

Errors are classified once, at the connector boundary (``classify_http``,
``classify_pg``), and re-raised ``from`` the original exception. Messages never carry
secrets or field values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class SyncAgentError(Exception):
    """Root of every error syncagent raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: which file, which dotted key, and why."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.reason}"


class ConfigError(SyncAgentError):
    """The configuration is invalid; carries every problem found, not only the first."""

    def __init__(self, errors: Sequence[ConfigIssue]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors) or "invalid configuration")


class RetryableError(SyncAgentError):
    """A transient failure: timeouts, 5xx, lock conflicts, a server restarting."""


class RateLimited(RetryableError):
    """The server asked us to slow down; ``retry_after`` is in seconds when it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BudgetExhausted(RateLimited):
    """The configured API budget (per day or per run) is used up; work waits until it resets."""


class PermanentError(SyncAgentError):
    """A failure that retrying will not fix: a person has to act."""


class AuthError(PermanentError):
    """Credentials were refused (after one refresh, for token-based APIs)."""


class CursorUnavailable(PermanentError):
    """The source can no longer serve the requested position; the fix is a resync."""


class DataError(SyncAgentError):
    """One record is bad: it goes to the exception queue with its trace, the rest flow."""

    def __init__(self, record: str, field: str | None, reason: str) -> None:
        self.record = record
        self.field = field
        self.reason = reason
        where = f"{record}.{field}" if field else record
        super().__init__(f"{where}: {reason}")


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the CLI's exit code: 2 for bad config or usage, else 1."""
    return 2 if isinstance(exc, ConfigError) else 1

"""Classify psycopg failures into syncagent's error tree, once, at the PostgreSQL boundary.

``classify_pg`` is the only place that looks at SQLSTATEs. It walks the cause chain (a
psycopg error may hide behind another exception), picks the class that tells the caller
what to do (retry, fix credentials, run ``syncagent init``, resync, park the record), and
re-raises ``from`` the original. Messages name the server as host:port, never the password.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from agent.errors import (
    AuthError,
    CursorUnavailable,
    DataError,
    PermanentError,
    RetryableError,
    SyncAgentError,
)

# SQLSTATEs a later attempt can succeed on: lost connections, serialization failures and
# deadlocks, lock timeouts, an object in use (a slot peeked by another session), a cancelled
# statement, the server shutting down or starting, and exhausted resources.
_RETRYABLE_EXACT = frozenset({"40001", "40P01", "55P03", "55006", "57014", "57P01", "57P02", "57P03"})
_RETRYABLE_CLASSES = ("08", "53")
_AUTH_CLASSES = ("28",)
_DATA_CLASSES = ("22", "23")

# libpq reports connection-time refusals without a SQLSTATE; these phrases tell them apart.
_AUTH_PHRASES = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "password is required",
    "permission denied for database",
)
_ROLE_MISSING = re.compile(r'role "[^"]*" does not exist')
_DB_MISSING = re.compile(r'database "[^"]*" does not exist')
_SLOT_MISSING = re.compile(r'replication slot "([^"]*)" does not exist')
_PUB_MISSING = re.compile(r'publication "([^"]*)" does not exist')
_SLOT_INVALID = re.compile(r'replication slot "([^"]*)"')
# libpq's connection-failure text: 'connection failed: connection to server at "h" (ip), port p
# failed: FATAL:  reason', or psycopg's own 'failed to resolve host 'h': reason'.
_SERVER_AT = re.compile(r'connection to server at "([^"]*)"(?: \([^)]*\))?, port (\d+) failed: ')
_SERVER_SOCKET = re.compile(r'connection to server on socket "([^"]*)" failed: ')
_RESOLVE = re.compile(r"failed to resolve host '([^']*)': ")
_NOISE = re.compile(r"^(?:connection failed: )?|(?:FATAL|ERROR):\s+")
_SECRET = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def _find_pg_error(exc: BaseException) -> psycopg.Error | None:
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, psycopg.Error):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


def _redact(text: str) -> str:
    return _SECRET.sub(r"\1***", text)


def _first_line(exc: psycopg.Error) -> str:
    primary = exc.diag.message_primary if exc.sqlstate else None
    text = primary or str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else text
    if not exc.sqlstate:
        for pattern in (_SERVER_AT, _SERVER_SOCKET, _RESOLVE):
            line = pattern.sub("", line)
        line = _NOISE.sub("", line)
    return _redact(line.strip() or type(exc).__name__)


def _server_of(exc: psycopg.Error, target: str | None) -> str:
    if target:
        return target
    text = str(exc)
    found = _SERVER_AT.search(text)
    if found:
        return f"{found.group(1)}:{found.group(2)}"
    found = _RESOLVE.search(text)
    if found:
        return f"host {found.group(1)!r} (name not resolved)"
    found = _SERVER_SOCKET.search(text)
    if found:
        return f"socket {found.group(1)}"
    pgconn = exc.pgconn
    if pgconn is not None:
        try:
            host = (pgconn.host or b"").decode(errors="replace")
            port = (pgconn.port or b"").decode(errors="replace")
        except Exception:  # pragma: no cover - a finished PGconn may refuse attribute access
            host = port = ""
        if host:
            return f"{host}:{port}" if port else host
    return "the PostgreSQL server"


def classify(
    exc: BaseException, what: str = "PostgreSQL", *, target: str | None = None, record: str | None = None
) -> SyncAgentError | None:
    """Return the syncagent error for ``exc`` (a psycopg error or one caused by it), else None.

    ``what`` names the operation ("peek slot syncagent"), ``target`` the server as host:port
    (taken from the failed connection when omitted), ``record`` the row for data errors.
    """
    if isinstance(exc, SyncAgentError):
        return exc
    err = _find_pg_error(exc)
    if err is None:
        return None
    state = err.sqlstate or ""
    reason = _first_line(err)
    server = _server_of(err, target)

    missing_slot = _SLOT_MISSING.search(reason)
    if missing_slot:
        slot = missing_slot.group(1)
        return CursorUnavailable(
            f"{what}: replication slot {slot!r} does not exist on {server}; its position is lost. "
            "Fix: run `syncagent init` and a resync (`syncagent checkpoint rewind`)"
        )
    detail = (err.diag.message_detail if err.sqlstate else None) or ""
    if "invalidated" in reason.lower() or "invalidated" in detail.lower():
        found = _SLOT_INVALID.search(reason)
        slot = found.group(1) if found else "?"
        return CursorUnavailable(
            f"{what}: replication slot {slot!r} on {server} was invalidated (WAL it needed was "
            "removed). Fix: drop it, run `syncagent init` and a resync (`syncagent checkpoint rewind`)"
        )
    missing_pub = _PUB_MISSING.search(reason)
    if missing_pub:
        return PermanentError(
            f"{what}: publication {missing_pub.group(1)!r} does not exist on {server}. "
            "Fix: run `syncagent init`"
        )

    if not state:
        lowered = reason.lower()
        if any(p in lowered for p in _AUTH_PHRASES) or _ROLE_MISSING.search(reason):
            return AuthError(
                f"{what}: {server} refused the credentials: {reason}. Fix: check the user, the "
                "password credential and pg_hba.conf"
            )
        if _DB_MISSING.search(reason):
            return PermanentError(f"{what}: {server}: {reason}. Fix: correct the dbname in the DSN")
        if isinstance(err, psycopg.OperationalError | psycopg.InterfaceError):
            return RetryableError(
                f"{what}: cannot reach PostgreSQL at {server}: {reason}. Fix: check that the server "
                "runs and accepts TCP connections there (host, port, firewall); will retry"
            )
        return PermanentError(f"{what}: {reason} ({server})")

    if state in _RETRYABLE_EXACT or state.startswith(_RETRYABLE_CLASSES):
        return RetryableError(
            f"{what}: transient failure on {server} (SQLSTATE {state}): {reason}; will retry"
        )
    if state.startswith(_AUTH_CLASSES):
        return AuthError(
            f"{what}: {server} refused the credentials (SQLSTATE {state}): {reason}. Fix: check the "
            "user, the password credential and pg_hba.conf"
        )
    if state.startswith(_DATA_CLASSES):
        column = err.diag.column_name
        return DataError(record or what, column, f"SQLSTATE {state}: {reason}")
    if state.startswith("42"):
        fix = (
            "Fix: grant the privilege to the agent's role (see packaging/postgres-setup.sql)"
            if state == "42501"
            else "Fix: check the table mapping and run `syncagent check`"
        )
        return PermanentError(f"{what}: {reason} (SQLSTATE {state}, {server}). {fix}")
    return PermanentError(f"{what}: {reason} (SQLSTATE {state}, {server})")


@contextmanager
def classify_pg(
    what: str = "PostgreSQL", *, target: str | None = None, record: str | None = None
) -> Iterator[None]:
    """Re-raise psycopg failures inside the block as syncagent errors, ``from`` the original.

    Args:
        what: the operation, for the message ("advance slot syncagent").
        target: the server as host:port; when omitted, taken from the failed connection.
        record: the record a data error (SQLSTATE 22/23) belongs to.
    """
    try:
        yield
    except SyncAgentError:
        raise
    except Exception as exc:
        mapped = classify(exc, what, target=target, record=record)
        if mapped is None:
            raise
        raise mapped from exc

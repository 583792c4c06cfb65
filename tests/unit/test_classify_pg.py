"""classify_pg maps psycopg failures (and what they cause) to the syncagent error tree."""

from __future__ import annotations

import psycopg
import psycopg.errors as pge
import pytest

from agent.errors import (
    AuthError,
    CursorUnavailable,
    DataError,
    PermanentError,
    RetryableError,
    SyncAgentError,
)
from connectors.postgres.errors import classify, classify_pg


def _raise_in(exc: BaseException, **kw: object) -> SyncAgentError:
    with pytest.raises(SyncAgentError) as info, classify_pg("peek slot s1", **kw):  # type: ignore[arg-type]
        raise exc
    assert info.value.__cause__ is exc
    return info.value


@pytest.mark.parametrize(
    ("error_class", "expected"),
    [
        (pge.SerializationFailure, RetryableError),
        (pge.DeadlockDetected, RetryableError),
        (pge.LockNotAvailable, RetryableError),
        (pge.AdminShutdown, RetryableError),
        (pge.CrashShutdown, RetryableError),
        (pge.CannotConnectNow, RetryableError),
        (pge.ConnectionFailure, RetryableError),
        (pge.TooManyConnections, RetryableError),
        (pge.DiskFull, RetryableError),
        (pge.ObjectInUse, RetryableError),
        (pge.InvalidPassword, AuthError),
        (pge.InvalidAuthorizationSpecification, AuthError),
        (pge.UndefinedTable, PermanentError),
        (pge.InsufficientPrivilege, PermanentError),
        (pge.SyntaxError, PermanentError),
        (pge.NumericValueOutOfRange, DataError),
        (pge.UniqueViolation, DataError),
        (pge.NotNullViolation, DataError),
    ],
)
def test_classify_pg_maps_sqlstate_when_error_has_one(error_class: type, expected: type) -> None:
    err = _raise_in(error_class("boom"))
    assert isinstance(err, expected)
    if expected is RetryableError:
        assert not isinstance(err, PermanentError)


def test_classify_pg_keeps_subclass_apart_when_auth_is_permanent() -> None:
    err = _raise_in(pge.InvalidPassword('password authentication failed for user "x"'))
    assert isinstance(err, PermanentError)
    assert "pg_hba.conf" in str(err)


def test_classify_pg_raises_cursor_unavailable_with_fix_when_slot_missing() -> None:
    err = _raise_in(pge.UndefinedObject('replication slot "erp_slot" does not exist'))
    assert isinstance(err, CursorUnavailable)
    assert "'erp_slot'" in str(err)
    assert "syncagent init" in str(err)
    assert "syncagent checkpoint rewind" in str(err)


def test_classify_pg_says_run_init_when_publication_missing() -> None:
    err = _raise_in(pge.UndefinedObject('publication "erp_pub" does not exist'))
    assert isinstance(err, PermanentError)
    assert not isinstance(err, CursorUnavailable)
    assert "'erp_pub'" in str(err) and "syncagent init" in str(err)


def test_classify_pg_raises_cursor_unavailable_when_slot_invalidated() -> None:
    err = _raise_in(
        pge.ObjectNotInPrerequisiteState('cannot read from logical replication slot "s1": invalidated')
    )
    assert isinstance(err, CursorUnavailable)
    assert "'s1'" in str(err)


def test_classify_pg_names_host_port_not_password_when_connection_refused() -> None:
    exc = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.5", port 5433 failed: Connection refused'
    )
    err = _raise_in(exc, target="10.0.0.5:5433")
    assert isinstance(err, RetryableError)
    assert "10.0.0.5:5433" in str(err)


def test_classify_pg_redacts_password_when_message_carries_a_dsn() -> None:
    exc = psycopg.OperationalError("invalid dsn: host=db port=5432 password=hunter2 bogus")
    err = _raise_in(exc, target="db:5432")
    assert "hunter2" not in str(err)
    assert "db:5432" in str(err)


def test_classify_pg_reports_auth_error_when_connect_refuses_password() -> None:
    exc = psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '
        'password authentication failed for user "cdc"'
    )
    assert isinstance(_raise_in(exc), AuthError)


def test_classify_pg_reports_permanent_when_database_missing() -> None:
    exc = psycopg.OperationalError('connection failed: FATAL:  database "erp" does not exist')
    err = _raise_in(exc)
    assert isinstance(err, PermanentError) and "dbname" in str(err)


def test_classify_pg_walks_cause_chain_when_psycopg_error_is_wrapped() -> None:
    inner = pge.DeadlockDetected("deadlock detected")
    try:
        try:
            raise inner
        except pge.DeadlockDetected as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as outer:
        mapped = classify(outer, "apply ops")
    assert isinstance(mapped, RetryableError)


def test_classify_pg_puts_record_on_data_error_when_given() -> None:
    err = _raise_in(pge.CheckViolation("new row violates check constraint"), record="public.orders:42")
    assert isinstance(err, DataError)
    assert err.record == "public.orders:42"


def test_classify_pg_passes_through_when_not_a_database_error() -> None:
    with pytest.raises(KeyError), classify_pg("x"):
        raise KeyError("k")


def test_classify_pg_keeps_syncagent_errors_when_already_classified() -> None:
    original = CursorUnavailable("gone")
    with pytest.raises(CursorUnavailable) as info, classify_pg("x"):
        raise original
    assert info.value is original


@pytest.mark.parametrize(
    ("text", "server"),
    [
        (
            'connection failed: connection to server at "db.erp.lan" (10.1.2.3), port 6432 failed: timeout',
            "db.erp.lan:6432",
        ),
        ("failed to resolve host 'db.nowhere': [Errno -2] Name or service not known", "'db.nowhere'"),
    ],
)
def test_classify_pg_finds_server_in_message_when_no_target_given(text: str, server: str) -> None:
    err = _raise_in(psycopg.OperationalError(text))
    assert isinstance(err, RetryableError)
    assert server in str(err)
    assert "connection failed: connection to server" not in str(err)

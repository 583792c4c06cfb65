"""``syncagent check`` for a PostgreSQL source: every setup fault as a Problem with its fix.

Checks the server (version, wal_level, free slots), each mapped table (exists, replica
identity usable, row filter compatible, readable), the role (REPLICATION, EXECUTE on the
origin session function), and the objects ``syncagent init`` creates (publication with all
tables, pgoutput slot not invalidated, origin). A server that cannot be reached is one
Problem naming host:port and what to check, never a traceback and never the password.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import psycopg

from agent.errors import AuthError, ConfigError, RetryableError
from agent.model import Problem
from connectors.postgres.errors import classify
from connectors.postgres.slot import PLUGIN, TableSpec, describe_table, identity_fix, row_filter_issues

__all__ = ["check"]

_MIN_VERSION = 110000
_IDENTITY_NAMES = {"d": "DEFAULT", "f": "FULL", "i": "USING INDEX", "n": "NOTHING"}
_INIT = "run `syncagent init`"


def check(
    connect: Callable[[], psycopg.Connection],
    *,
    slot: str,
    publication: str,
    origin: str,
    tables: Sequence[TableSpec],
) -> list[Problem]:
    """Return every problem found with the server, the mapped tables, the role and init's objects."""
    try:
        conn = connect()
    except Exception as exc:
        return [_failure("postgres connection", exc, "connect to PostgreSQL")]
    problems: list[Problem] = []
    try:
        with conn:
            conn.autocommit = True
            problems += _server(conn, slot)
            problems += _role(conn)
            for spec in tables:
                problems += _table(conn, spec)
            problems += _publication(conn, publication, tables)
            problems += _slot(conn, slot)
            problems += _origin(conn, origin)
    except Exception as exc:
        problems.append(_failure("postgres", exc, "check"))
    return problems


def _failure(subject: str, exc: Exception, what: str) -> Problem:
    mapped = classify(exc, what)
    if mapped is None:
        raise exc
    message, _, fix = str(mapped).partition(". Fix: ")
    if not fix:
        if isinstance(mapped, AuthError):
            fix = "check the user, the password credential and pg_hba.conf"
        elif isinstance(mapped, RetryableError):
            fix = "check that the server runs and accepts TCP connections at that host and port"
        else:
            fix = "check the DSN (host, port, dbname, user)"
    return Problem(subject=subject, message=message, fix=fix.removesuffix("; will retry"))


def _server(conn: psycopg.Connection, slot: str) -> list[Problem]:
    out: list[Problem] = []
    version = int(conn.info.server_version)
    if version < _MIN_VERSION:
        out.append(
            Problem(
                "postgres server",
                f"PostgreSQL {version // 10000} is too old: syncagent needs 11 or newer "
                "(slot advance, pgoutput Truncate)",
                "upgrade the server",
            )
        )
    row = conn.execute(
        "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int, "
        "(SELECT count(*) FROM pg_replication_slots), "
        "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
        (slot,),
    ).fetchone()
    assert row is not None
    wal_level, max_slots, used, ours = row
    if wal_level != "logical":
        out.append(
            Problem(
                "postgres server",
                f"wal_level is {wal_level!r}; logical decoding needs 'logical'",
                "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL",
            )
        )
    if not ours and used >= max_slots:
        out.append(
            Problem(
                "postgres server",
                f"all {max_slots} replication slots are in use (max_replication_slots)",
                "raise max_replication_slots (restart needed) or drop an unused slot",
            )
        )
    return out


def _role(conn: psycopg.Connection) -> list[Problem]:
    out: list[Problem] = []
    row = conn.execute(
        "SELECT current_user::text, rolreplication, rolsuper, "
        "has_function_privilege('pg_replication_origin_session_setup(text)', 'EXECUTE') "
        "FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    user, replication, superuser, can_setup = row
    if not (replication or superuser):
        out.append(
            Problem(
                f"postgres role {user}",
                "the role lacks the REPLICATION attribute, so it cannot read the slot",
                f'ALTER ROLE "{user}" REPLICATION;',
            )
        )
    if not can_setup:
        out.append(
            Problem(
                f"postgres role {user}",
                "the role may not call pg_replication_origin_session_setup, so the agent's own "
                "writes to the ERP could not be told apart from users' (echoes)",
                f'GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text) TO "{user}";',
            )
        )
    return out


def _table(conn: psycopg.Connection, spec: TableSpec) -> list[Problem]:
    subject = f"table {spec.qualified_name}"
    info = describe_table(conn, spec.schema, spec.table)
    if info is None:
        return [Problem(subject, f"table {spec.qualified_name} does not exist", "correct the table mapping")]
    out: list[Problem] = []
    identity = _IDENTITY_NAMES.get(info.replica_identity, info.replica_identity)
    if info.replica_identity == "n" or not info.identity_columns:
        out.append(
            Problem(
                subject,
                f"no primary key and REPLICA IDENTITY {identity}: once published, PostgreSQL would "
                "refuse its UPDATEs and DELETEs, and deletes could not be identified",
                identity_fix(spec),
            )
        )
    else:
        out.append(
            Problem(
                subject,
                f"REPLICA IDENTITY {identity} ({', '.join(info.identity_columns)})",
                severity="info",
            )
        )
    if spec.key_columns:
        unknown = [k for k in spec.key_columns if k not in info.column_names]
        if unknown:
            out.append(
                Problem(subject, f"key_columns {', '.join(unknown)} are not columns", "fix key_columns")
            )
    if spec.updated_at_column and spec.updated_at_column not in info.column_names:
        out.append(
            Problem(
                subject, f"updated_at_column {spec.updated_at_column!r} is not a column", "fix the mapping"
            )
        )
    try:
        for reason in row_filter_issues(spec, info, int(conn.info.server_version)):
            out.append(Problem(subject, reason, "change the row filter or the replica identity"))
    except ConfigError as exc:
        out += [Problem(subject, e.reason, "correct the row filter") for e in exc.errors]
    readable = conn.execute("SELECT has_table_privilege(%s::oid, 'SELECT')", (info.oid,)).fetchone()
    if not (readable and readable[0]):
        out.append(
            Problem(
                subject,
                "the role may not SELECT from it (needed for resync)",
                f'GRANT SELECT ON "{spec.schema}"."{spec.table}" TO CURRENT_USER;',
            )
        )
    return out


def _publication(conn: psycopg.Connection, publication: str, tables: Sequence[TableSpec]) -> list[Problem]:
    subject = f"publication {publication}"
    row = conn.execute(
        "SELECT puballtables FROM pg_publication WHERE pubname = %s", (publication,)
    ).fetchone()
    if row is None:
        return [Problem(subject, "the publication does not exist", _INIT)]
    if row[0]:
        return []
    present = {
        f"{s}.{t}"
        for s, t in conn.execute(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    }
    missing = sorted(t.qualified_name for t in tables if t.qualified_name not in present)
    if missing:
        return [Problem(subject, f"it does not publish {', '.join(missing)}", _INIT)]
    return []


def _slot(conn: psycopg.Connection, slot: str) -> list[Problem]:
    subject = f"replication slot {slot}"
    version = int(conn.info.server_version)
    wal_status = "wal_status" if version >= 130000 else "NULL::text"
    row = conn.execute(
        f"SELECT plugin::text, slot_type, database::text, {wal_status}, restart_lsn IS NULL "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return [Problem(subject, "the slot does not exist", _INIT)]
    plugin, slot_type, database, status, invalid = row
    out: list[Problem] = []
    if slot_type != "logical" or plugin != PLUGIN:
        out.append(
            Problem(
                subject,
                f"the slot is a {slot_type} slot with plugin {plugin!r}, not {PLUGIN!r}",
                "choose another slot name, or drop that slot if nothing else uses it",
            )
        )
    if database != conn.info.dbname:
        out.append(Problem(subject, f"the slot belongs to database {database!r}", "choose another slot name"))
    if status == "lost" or invalid:
        out.append(
            Problem(
                subject,
                "the slot was invalidated: the WAL it needed was removed, so changes were lost",
                f"SELECT pg_drop_replication_slot('{slot}'); then {_INIT} and a resync "
                "(`syncagent checkpoint rewind`)",
            )
        )
    elif status == "unreserved":
        out.append(
            Problem(
                subject,
                "the slot is about to lose WAL it needs (wal_status unreserved)",
                "let the agent catch up now, or raise max_slot_wal_keep_size",
                severity="warning",
            )
        )
    return out


def _origin(conn: psycopg.Connection, origin: str) -> list[Problem]:
    row = conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)).fetchone()
    if row is None:
        return [Problem(f"replication origin {origin}", "the origin does not exist", _INIT)]
    return []

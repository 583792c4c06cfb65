"""What keeps the PostgreSQL sink from writing: tables, keys, privileges and the origin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from agent.model import Problem

_SETUP_FUNCTION = "pg_replication_origin_session_setup(text)"

_TABLE_SQL = """
SELECT c.oid,
       (SELECT array_agg(a.attname::text ORDER BY u.ord)
        FROM pg_index i
        CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS u(attnum, ord)
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
        WHERE i.indrelid = c.oid AND i.indisprimary),
       has_table_privilege(c.oid, 'SELECT'),
       has_table_privilege(c.oid, 'INSERT'),
       has_table_privilege(c.oid, 'UPDATE'),
       has_table_privilege(c.oid, 'DELETE')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""


def _current_role(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    return sql.Identifier(row[0] if row else "?").as_string(conn)


def check_sink(
    conn: psycopg.Connection[Any], subject: str, tables: Mapping[str, Any], origin: str
) -> list[Problem]:
    """Each table exists with its key and grants, and the origin exists and may be used."""
    problems: list[Problem] = []
    role = _current_role(conn)
    for object_name, target in tables.items():
        row = conn.execute(_TABLE_SQL, (target.schema, target.table)).fetchone()
        where = f"{subject}: {object_name}"
        if row is None:
            problems.append(
                Problem(
                    where,
                    f"table {target.qualified} does not exist",
                    "create it, or correct the table in the sink's config",
                )
            )
            continue
        _oid, pk, can_select, can_insert, can_update, can_delete = row
        if set(pk or ()) != set(target.primary_key):
            problems.append(
                Problem(
                    where,
                    f"primary key of {target.qualified} is {tuple(pk or ())}, configured "
                    f"{target.primary_key}",
                    "correct primary_key in the sink's config",
                )
            )
        missing = [
            p for p, ok in (("SELECT", can_select), ("INSERT", can_insert), ("UPDATE", can_update)) if not ok
        ]
        grant = f"GRANT {{}} ON {target.identifier().as_string(conn)} TO {role};"
        if missing:
            problems.append(
                Problem(
                    where,
                    f"role {role} lacks {', '.join(missing)} on {target.qualified}",
                    grant.format(", ".join(missing)),
                )
            )
        if not can_delete:
            problems.append(
                Problem(
                    where,
                    f"role {role} lacks DELETE on {target.qualified}; delete ops will fail",
                    grant.format("DELETE"),
                    severity="warning",
                )
            )
    found = conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)).fetchone()
    if found is None:
        problems.append(
            Problem(subject, f"replication origin {origin!r} does not exist", "run `syncagent init`")
        )
    may_use = conn.execute("SELECT has_function_privilege(%s, 'EXECUTE')", (_SETUP_FUNCTION,)).fetchone()
    if not (may_use and may_use[0]):
        problems.append(
            Problem(
                subject,
                f"role {role} may not use replication origins; its writes would echo back",
                f"GRANT EXECUTE ON FUNCTION {_SETUP_FUNCTION} TO {role};",
            )
        )
    return problems

"""Write ops into the ERP's PostgreSQL tables, in a session tagged with a replication origin.

Every transaction the sink commits carries the origin (``pg_replication_origin_session_setup``
runs once per connection), so pgoutput sends an Origin message after its Begin and capture
can drop our own echoes. One ``apply`` call is one transaction; each op runs inside its own
savepoint, so a bad row is rolled back alone and answered with a ``reject`` outcome, a locked
row with a ``retry`` outcome, while the other ops commit. A lost connection or a failed COMMIT
raises ``RetryableError`` for the whole batch: nothing is reported applied unless committed.
If the connection drops during COMMIT the outcome is unknown; replaying the batch is safe
because every write is an upsert by key that skips rows already holding the values.

Upsert by key, without ``ON CONFLICT``: the key may be an external-id column (``crm_id``)
that has no unique constraint, and ``ON CONFLICT`` needs one. The sink runs ``UPDATE ... WHERE
<key> AND <some field IS DISTINCT FROM its new value> RETURNING <pk>``; when that touches no
row it looks the key up, and inserts only when the row is missing. A row already equal to the
op is never written, so a replay produces no WAL and no echo. Where a unique constraint does
cover the key, a concurrent insert of the same key surfaces as a unique violation on our
INSERT; the op is then tried once more, and the UPDATE branch finds the row. Without such a
constraint two writers could both insert; the agent has one delivery job per target, and an
ambiguous key (two rows) is rejected rather than guessed.

A ``unit`` op applies several upserts in one savepoint, all or none (``connectors.postgres.units``).

Values are sent as text with an unknown type (psycopg 3 does this for ``str``), so PostgreSQL
casts each literal to its column's type, typmod included, exactly as it would a quoted
literal. Identifiers always go through ``psycopg.sql.Identifier``; values are always
parameters.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from time import monotonic, sleep
from typing import Any

import psycopg
from psycopg import sql

from agent.errors import AuthError, PermanentError, RetryableError, SyncAgentError
from agent.model import Op, Outcome, Problem, utcnow
from connectors.postgres.errors import classify_pg
from connectors.postgres.sink_checks import check_sink
from connectors.postgres.units import apply_unit

logger = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT = 5.0

_SETUP_FUNCTION = "pg_replication_origin_session_setup(text)"
#: How long a new session waits for a dead predecessor to let go of the origin.
ORIGIN_WAIT_SECONDS = 5.0
# A locked row, a serialization failure, a deadlock or a statement timeout concern one op:
# it waits in the outbox while the rest of the batch commits.
_ROW_RETRY = frozenset({"55P03", "40001", "40P01", "57014"})
# Bad data (22), violated constraints (23), a mapping the table does not match (42, except a
# missing privilege, which is the role's setup), WITH CHECK OPTION (44) and errors raised by
# the ERP's own triggers (P0) belong to one op and go to the exception queue.
_ROW_REJECT_CLASSES = ("22", "23", "42", "44", "P0")
_SETUP_PROBLEMS = frozenset({"42501"})
# PostgreSQL quotes the offending input at the end of some messages
# ('invalid input syntax for type numeric: "abc"'); that part is a value and is cut.
_QUOTED_VALUE = re.compile(r':\s*".*"\s*$', re.DOTALL)
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

_COLUMNS_SQL = """
SELECT a.attname,
       EXISTS (SELECT 1 FROM pg_operator o
               WHERE o.oprname = '=' AND o.oprleft = o.oprright
                 AND o.oprleft = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
"""

_CONSTRAINT_COLUMNS_SQL = """
SELECT a.attname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN LATERAL (
    SELECT k.conkey::int2[] AS cols FROM pg_constraint k
    WHERE k.conrelid = c.oid AND k.conname = %(name)s
    UNION ALL
    SELECT i.indkey::int2[] FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
    WHERE i.indrelid = c.oid AND ic.relname = %(name)s
    LIMIT 1
) s ON true
CROSS JOIN LATERAL unnest(s.cols) WITH ORDINALITY AS u(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
WHERE n.nspname = %(schema)s AND c.relname = %(table)s
ORDER BY u.ord
"""


@dataclass(frozen=True, slots=True)
class SinkTable:
    """One ERP table the sink writes: where it is and which columns form its primary key."""

    schema: str
    table: str
    primary_key: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.primary_key:
            raise ValueError(f"table {self.schema}.{self.table} needs at least one primary key column")

    @property
    def qualified(self) -> str:
        """The table as ``schema.table``, for messages (not for SQL)."""
        return f"{self.schema}.{self.table}"

    def identifier(self) -> sql.Identifier:
        """The table as a quoted, schema-qualified SQL identifier."""
        return sql.Identifier(self.schema, self.table)


@dataclass(frozen=True, slots=True)
class _Written:
    """An op that went through: the row's primary key, and whether a row was changed."""

    external_id: str
    wrote: bool


class _Refused(Exception):
    """Raised inside an op's savepoint to roll it back and answer ``outcome`` instead."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class PostgresSink:
    """A ``Sink`` that upserts and deletes rows in PostgreSQL under a replication origin."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], psycopg.Connection[Any]],
        *,
        origin: str,
        tables: Mapping[str, SinkTable],
        clock: Callable[[], datetime] = utcnow,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.name = name
        self._connect = connect
        self._origin = origin
        self._tables = dict(tables)
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._conn: psycopg.Connection[Any] | None = None
        # object_name -> {column: has its own '=' operator}; cleared on every reconnect.
        self._columns: dict[str, dict[str, bool]] = {}
        self._generated: dict[str, bool] = {}

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in one transaction and return one outcome per op, in order.

        Raises:
            RetryableError: the connection or the COMMIT failed; nothing of the batch is applied.
            PermanentError: the origin is missing, or the role lacks a privilege.
            AuthError: the role may not use the replication origin, or was refused.
        """
        if not ops:
            return []
        started = self._clock()
        try:
            with classify_pg(f"apply {len(ops)} ops to sink {self.name}"):
                conn = self._session()
                outcomes = self._apply_batch(conn, ops)
        except BaseException:
            self._drop()
            raise
        self._log_batch(ops, outcomes, started)
        return outcomes

    def check(self) -> list[Problem]:
        """Return what keeps this sink from writing: tables, keys, privileges and the origin."""
        subject = f"postgres sink {self.name}"
        try:
            with classify_pg(f"check sink {self.name}"):
                conn = self._connect()
                try:
                    return check_sink(conn, subject, self._tables, self._origin)
                finally:
                    conn.close()
        except SyncAgentError as exc:
            return [Problem(subject, str(exc), "check the DSN, the server and the role's access")]

    def close(self) -> None:
        """Close the connection, which also frees the replication origin for another session."""
        self._drop()

    # -- session -------------------------------------------------------------------------

    def _session(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop()
        conn = self._connect()
        try:
            conn.autocommit = True
            conn.execute(
                "SELECT set_config('lock_timeout', %s, false)", (f"{int(self._lock_timeout * 1000)}ms",)
            )
            self._setup_origin(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _setup_origin(self, conn: psycopg.Connection[Any]) -> None:
        # After a crash the dead agent's backend holds the origin until the server notices the
        # lost client, a moment later: wait that moment out instead of failing the first batch.
        deadline = monotonic() + ORIGIN_WAIT_SECONDS
        while True:
            try:
                self._setup_origin_once(conn)
                return
            except RetryableError:
                if monotonic() >= deadline:
                    raise
                sleep(0.2)

    def _setup_origin_once(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute("SELECT pg_replication_origin_session_setup(%s)", (self._origin,))
        except psycopg.errors.InsufficientPrivilege as exc:
            role = _current_role(conn)
            raise AuthError(
                f"sink {self.name}: role {role} may not use replication origin {self._origin!r}, so "
                f"its writes would come back as echoes. Fix: as a superuser, run GRANT EXECUTE ON "
                f"FUNCTION {_SETUP_FUNCTION} TO {role};"
            ) from exc
        except psycopg.errors.UndefinedObject as exc:
            raise PermanentError(
                f"sink {self.name}: replication origin {self._origin!r} does not exist. "
                "Fix: run `syncagent init`"
            ) from exc
        except psycopg.errors.ObjectInUse as exc:
            raise RetryableError(
                f"sink {self.name}: replication origin {self._origin!r} is in use by another "
                "session (another agent, or a previous session not yet ended); will retry"
            ) from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._columns.clear()
        if conn is not None and not conn.closed:
            conn.close()

    # -- batch ---------------------------------------------------------------------------

    def _apply_batch(self, conn: psycopg.Connection[Any], ops: Sequence[Op]) -> list[Outcome]:
        results: list[Outcome | _Written] = []
        with conn.transaction():
            # A deferred constraint failing at COMMIT cannot be blamed on one op and would fail
            # the whole batch on every retry; checked per statement, it rejects its own op.
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
            for op in ops:
                results.append(self._apply_op(conn, op))
            version, written_at = _stamp(conn)
            if not any(isinstance(r, _Written) and r.wrote for r in results):
                version = None
        return [
            Outcome.applied(r.external_id, version if r.wrote else None, written_at)
            if isinstance(r, _Written)
            else r
            for r in results
        ]

    def _apply_op(self, conn: psycopg.Connection[Any], op: Op) -> Outcome | _Written:
        if op.action == "unit":
            done = apply_unit(op, lambda step: self._apply_op(conn, step), conn.transaction)
            return done if isinstance(done, Outcome) else _Written(json.dumps(done[0]), done[1])
        target = self._tables.get(op.object_name)
        if target is None:
            return Outcome.reject("unknown_object", f"no table is mapped for object {op.object_name!r}")
        refused = self._validate(conn, op, target)
        if refused is not None:
            return refused
        for attempt in (1, 2):
            try:
                with conn.transaction():
                    if op.action == "delete":
                        return self._delete(conn, target, op)
                    return self._upsert(conn, target, op)
            except _Refused as exc:
                return exc.outcome
            except psycopg.Error as exc:
                if conn.broken or conn.closed or exc.sqlstate is None:
                    raise
                if exc.sqlstate == "23505" and op.action == "upsert" and attempt == 1:
                    continue  # the key may have been inserted concurrently: the UPDATE finds it now
                outcome = self._row_failure(conn, target, op, exc)
                if outcome is None:
                    raise
                return outcome
        raise AssertionError("unreachable")  # pragma: no cover

    def _validate(self, conn: psycopg.Connection[Any], op: Op, target: SinkTable) -> Outcome | None:
        if op.action not in ("upsert", "delete"):
            return Outcome.reject("unknown_action", f"action {op.action!r} is neither upsert nor delete")
        if not op.key:
            return Outcome.reject("missing_key", f"op for {target.qualified} has no key columns")
        for column, value in op.key.items():
            if value is None:
                return Outcome.reject("null_key", f"key column of {target.qualified} is null", column)
        columns = self._table_columns(conn, op.object_name, target, reload=False)
        unknown = [c for c in (*op.key, *op.fields) if c not in columns]
        if unknown:  # the table may have gained the column since it was read
            columns = self._table_columns(conn, op.object_name, target, reload=True)
            unknown = [c for c in unknown if c not in columns]
        if not columns:
            return Outcome.reject("undefined_table", f"table {target.qualified} does not exist")
        if unknown:
            return Outcome.reject(
                "undefined_column", f"table {target.qualified} has no column {unknown[0]!r}", unknown[0]
            )
        return None

    def _generated_key(self, conn: psycopg.Connection[Any], target: SinkTable) -> bool:
        """Tell whether the table's primary key has a default (serial, identity): ids the ERP makes."""
        key = target.qualified
        if key not in self._generated:
            row = conn.execute(
                "SELECT bool_and(a.atthasdef OR a.attidentity <> '') FROM pg_attribute a"
                " WHERE a.attrelid = to_regclass(%s) AND a.attname = ANY(%s)",
                (sql.Identifier(target.schema, target.table).as_string(conn), list(target.primary_key)),
            ).fetchone()
            self._generated[key] = bool(row and row[0])
        return self._generated[key]

    def _table_columns(
        self, conn: psycopg.Connection[Any], object_name: str, target: SinkTable, *, reload: bool
    ) -> dict[str, bool]:
        if reload or object_name not in self._columns:
            rows = conn.execute(_COLUMNS_SQL, (target.schema, target.table)).fetchall()
            self._columns[object_name] = {name: bool(comparable) for name, comparable in rows}
        return self._columns[object_name]

    # -- statements ----------------------------------------------------------------------

    def _upsert(self, conn: psycopg.Connection[Any], target: SinkTable, op: Op) -> _Written:
        types = self._columns[op.object_name]
        table = target.identifier()
        returning = _returning(target)
        where, where_params = _match(op.key, types)
        if op.fields:
            assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in op.fields)
            changed = sql.SQL(" OR ").join(_differs(c, types[c]) for c in op.fields)
            query = sql.SQL("UPDATE {} SET {} WHERE {} AND ({}) RETURNING {}").format(
                table, assignments, where, changed, returning
            )
            values = [_literal(v) for v in op.fields.values()]
            rows = conn.execute(query, [*values, *where_params, *values]).fetchall()
            if rows:
                return _Written(self._one_id(rows, target), wrote=True)
        query = sql.SQL("SELECT {} FROM {} WHERE {} LIMIT 2").format(returning, table, where)
        rows = conn.execute(query, where_params).fetchall()
        if rows:
            return _Written(self._one_id(rows, target), wrote=False)
        if op.action != "upsert":  # pragma: no cover - deletes never reach here
            raise AssertionError(op.action)
        if set(op.key) == set(target.primary_key) and self._generated_key(conn, target):
            # The ERP generates this table's ids, so an op naming one knew the row: it was
            # deleted in the ERP since. Re-creating it would undo that delete; a person decides.
            raise _Refused(
                Outcome.reject("record_deleted", f"{target.qualified} has no row with that key any more")
            )
        row = {**op.key, **op.fields}
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
            table,
            sql.SQL(", ").join(sql.Identifier(c) for c in row),
            sql.SQL(", ").join(sql.Placeholder() for _ in row),
            returning,
        )
        rows = conn.execute(query, [_literal(v) for v in row.values()]).fetchall()
        return _Written(self._one_id(rows, target), wrote=True)

    def _delete(self, conn: psycopg.Connection[Any], target: SinkTable, op: Op) -> _Written:
        where, params = _match(op.key, self._columns[op.object_name])
        query = sql.SQL("DELETE FROM {} WHERE {} RETURNING {}").format(
            target.identifier(), where, _returning(target)
        )
        rows = conn.execute(query, params).fetchall()
        if rows:
            return _Written(self._one_id(rows, target), wrote=True)
        # Already gone: deleting is idempotent. The id is then built from the op's key.
        if all(c in op.key for c in target.primary_key):
            return _Written(_render_id([_literal(op.key[c]) for c in target.primary_key]), wrote=False)
        return _Written(_render_id([_literal(v) for v in op.key.values()]), wrote=False)

    def _one_id(self, rows: Sequence[Sequence[Any]], target: SinkTable) -> str:
        if len(rows) > 1:
            raise _Refused(
                Outcome.reject("ambiguous_key", f"the key matches more than one row of {target.qualified}")
            )
        return _render_id(list(rows[0]))

    # -- row failures ----------------------------------------------------------------------

    def _row_failure(
        self, conn: psycopg.Connection[Any], target: SinkTable, op: Op, exc: psycopg.Error
    ) -> Outcome | None:
        state = exc.sqlstate or ""
        if state in _ROW_RETRY:
            return Outcome.retry(None, _condition(exc))
        if state in _SETUP_PROBLEMS or not state.startswith(_ROW_REJECT_CLASSES):
            return None
        if state.startswith("42"):  # the table changed under the cached columns: read them again
            self._columns.pop(op.object_name, None)
        primary = exc.diag.message_primary or type(exc).__name__
        field_name = exc.diag.column_name or self._blame(conn, target, op, exc)
        return Outcome.reject(_condition(exc), _QUOTED_VALUE.sub("", primary), field_name)

    def _blame(
        self, conn: psycopg.Connection[Any], target: SinkTable, op: Op, exc: psycopg.Error
    ) -> str | None:
        """Name the column behind a diagnostic that names none (a constraint, or bad input)."""
        diag = exc.diag
        if diag.constraint_name:
            params = {
                "schema": diag.schema_name or target.schema,
                "table": diag.table_name or target.table,
                "name": diag.constraint_name,
            }
            columns = [r[0] for r in conn.execute(_CONSTRAINT_COLUMNS_SQL, params).fetchall()]
            sent = [c for c in columns if c in op.fields or c in op.key]
            return (sent or columns or [None])[0]
        if (exc.sqlstate or "").startswith("22"):
            return self._probe(conn, target, op)
        return None

    def _probe(self, conn: psycopg.Connection[Any], target: SinkTable, op: Op) -> str | None:
        """Find the first column whose value its type (with typmod) does not accept."""
        # Input errors come from parameter conversion and carry no column; casting each value
        # alone into the table's row type, in its own savepoint, finds the one at fault.
        query = sql.SQL("SELECT jsonb_populate_record(NULL::{}, %s::jsonb) IS NULL").format(
            target.identifier()
        )
        for column, value in {**op.key, **op.fields}.items():
            try:
                with conn.transaction():
                    conn.execute(query, (json.dumps({column: _literal(value)}),))
            except psycopg.Error as exc:
                if conn.broken or conn.closed:
                    raise
                if (exc.sqlstate or "").startswith("22"):
                    return column
        return None

    # -- check -----------------------------------------------------------------------------

    def _log_batch(self, ops: Sequence[Op], outcomes: Sequence[Outcome], started: datetime) -> None:
        counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("applied", "retry", "reject")}
        for op, outcome in zip(ops, outcomes, strict=True):
            if outcome.status == "reject":
                logger.warning(
                    "sink_op_rejected",
                    extra={
                        "fields": {
                            "sink": self.name,
                            "op_id": op.op_id,
                            "trace_id": op.trace_id,
                            "object": op.object_name,
                            "reason": outcome.reason,
                            "field": outcome.field_name,
                        }
                    },
                )
        ms = int((self._clock() - started).total_seconds() * 1000)
        logger.info(
            "sink_batch_applied",
            extra={
                "fields": {
                    "sink": self.name,
                    "n": len(ops),
                    "applied": counts["applied"],
                    "retry": counts["retry"],
                    "reject": counts["reject"],
                    "ms": ms,
                }
            },
        )


def _current_role(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    return sql.Identifier(row[0] if row else "?").as_string(conn)


def _stamp(conn: psycopg.Connection[Any]) -> tuple[str | None, datetime | None]:
    """The batch's 32-bit xid (as pgoutput's Begin reports it) and the server clock after its writes.

    A transaction that changed a row before this batch did committed before the batch could
    lock that row, so its commit timestamp is earlier than this clock; one that changes it
    after must wait for this batch's commit, so its timestamp is later.
    """
    row = conn.execute("SELECT txid_current_if_assigned(), clock_timestamp()").fetchone()
    if row is None:
        return None, None
    xid = str(row[0] % 2**32) if row[0] is not None else None
    return xid, row[1]


def _returning(target: SinkTable) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in target.primary_key)


def _match(key: Mapping[str, Any], types: Mapping[str, bool]) -> tuple[sql.Composable, list[str | None]]:
    parts = [sql.SQL("{} = %s" if types[c] else "{}::text = %s::text").format(sql.Identifier(c)) for c in key]
    return sql.SQL(" AND ").join(parts), [_literal(v) for v in key.values()]


def _differs(column: str, comparable: bool) -> sql.Composable:
    # Types without an '=' of their own (json, xml, enums, arrays, varchar) compare as text:
    # exact for a replay, which sends the same text; at worst a needless write.
    template = "{} IS DISTINCT FROM %s" if comparable else "{}::text IS DISTINCT FROM %s::text"
    return sql.SQL(template).format(sql.Identifier(column))


def _render_id(values: Sequence[Any]) -> str:
    texts = [None if v is None else str(v) for v in values]
    if len(texts) == 1:
        return texts[0] or ""
    return json.dumps(texts)


def _condition(exc: psycopg.Error) -> str:
    """The SQLSTATE's condition name, as in PostgreSQL's errcodes ('not_null_violation')."""
    cls = type(exc)
    if exc.sqlstate and getattr(cls, "sqlstate", None) == exc.sqlstate:
        return _CAMEL.sub("_", cls.__name__).lower()
    return f"sqlstate_{exc.sqlstate}"


def _literal(value: Any) -> str | None:
    """Render a JSON-ish value as the text literal PostgreSQL casts to the column's type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)

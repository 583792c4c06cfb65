"""The ERP-side objects of capture: publication, logical slot and replication origin.

``ensure`` creates or realigns them idempotently and returns the exact SQL it ran (or, in a
dry run, would run); ``PeekCursor`` is the one peek per poll, streamed through a named
server-side cursor; ``advance`` moves the slot forward after the journal commit;
``slot_lag`` reports how much WAL the slot holds back. Functions here take an open psycopg
connection and classify every failure with :func:`classify_pg`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from agent.errors import ConfigError, ConfigIssue, CursorUnavailable, PermanentError
from connectors.postgres.errors import classify_pg
from connectors.postgres.filters import check_row_filter, referenced_columns
from connectors.postgres.pgoutput import lsn_to_str, str_to_lsn

logger = logging.getLogger(__name__)

PLUGIN = "pgoutput"
# COMMENT ON PUBLICATION carries a digest of the tables and filters we asked for: the server
# deparses row filters its own way, so comparing texts would never settle.
_SPEC_MARK = "syncagent spec "
_ROW_FILTER_MIN_VERSION = 150000
# Settings of every capture and resync session. The text converters of values.py rely on the
# first five; a peek of a large backlog must not be cut off by the ERP's role-level timeouts,
# and the pipeline keeps the peek's transaction open while it journals a chunk.
SESSION_SETTINGS = (
    "SET DateStyle = 'ISO, MDY'",
    "SET IntervalStyle = 'postgres'",
    "SET bytea_output = 'hex'",
    "SET TimeZone = 'UTC'",
    "SET extra_float_digits = 3",
    "SET statement_timeout = 0",
    "SET idle_in_transaction_session_timeout = 0",
)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One mapped table: its name, optional row filter, key override and modification column."""

    schema: str
    table: str
    row_filter: str | None = None
    key_columns: tuple[str, ...] | None = None
    updated_at_column: str | None = None

    @property
    def qualified_name(self) -> str:
        """Return ``schema.table``."""
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True, slots=True)
class TableInfo:
    """What the catalog says about a table: columns (name, type OID), keys and replica identity."""

    oid: int
    schema: str
    table: str
    columns: tuple[tuple[str, int], ...]
    primary_key: tuple[str, ...]
    replica_identity: str  # 'd' default, 'f' full, 'i' index, 'n' nothing
    identity_columns: tuple[str, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        """Return the column names in table order."""
        return tuple(name for name, _ in self.columns)


@dataclass(frozen=True, slots=True)
class SlotLag:
    """How far a slot is behind: its LSNs, the WAL it retains and the WAL not yet consumed."""

    confirmed_flush_lsn: str
    restart_lsn: str
    current_lsn: str
    retained_bytes: int
    pending_bytes: int
    wal_status: str | None
    active: bool


def open_session(connect: Callable[[], psycopg.Connection], what: str) -> psycopg.Connection:
    """Connect with ``connect`` and apply SESSION_SETTINGS; autocommit; failures classified."""
    with classify_pg(what):
        conn = connect()
        try:
            conn.autocommit = True
            for stmt in SESSION_SETTINGS:
                conn.execute(stmt.encode())
        except BaseException:
            conn.close()
            raise
    return conn


@contextmanager
def _autocommit(conn: psycopg.Connection) -> Iterator[None]:
    previous = conn.autocommit
    if not previous:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raise ValueError("this needs a connection outside a transaction (commit or roll back first)")
        conn.autocommit = True
    try:
        yield
    finally:
        if not previous and not conn.closed:
            conn.autocommit = False


_TABLE_SQL = """
SELECT c.oid, c.relreplident,
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'),
       coalesce((SELECT array_agg(a.atttypid::int8 ORDER BY a.attnum) FROM pg_attribute a
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'),
       coalesce((SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'),
       coalesce((SELECT array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum))
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                 WHERE i.indrelid = c.oid AND i.indisreplident), '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')
"""


def describe_table(conn: psycopg.Connection, schema: str, table: str) -> TableInfo | None:
    """Return the catalog facts of ``schema.table``, or None if there is no such table."""
    with classify_pg(f"describe table {schema}.{table}"):
        row = conn.execute(_TABLE_SQL, (schema, table)).fetchone()
    if row is None:
        return None
    oid, replident, names, types, pk, replident_index = row
    identity: tuple[str, ...]
    if replident == "f":
        identity = tuple(names)
    elif replident == "i":
        identity = tuple(replident_index)
    elif replident == "d":
        identity = tuple(pk)
    else:
        identity = ()
    return TableInfo(
        oid=int(oid),
        schema=schema,
        table=table,
        columns=tuple(zip(names, (int(t) for t in types), strict=True)),
        primary_key=tuple(pk),
        replica_identity=str(replident),
        identity_columns=identity,
    )


def identity_fix(spec: TableSpec) -> str:
    """Return the ALTER TABLE statements that give a table a usable replica identity."""
    name = f"{_quote(spec.schema)}.{_quote(spec.table)}"
    return f"ALTER TABLE {name} ADD PRIMARY KEY (<key columns>); or ALTER TABLE {name} REPLICA IDENTITY FULL;"


def _quote(name: str) -> str:
    if name.isidentifier() and name == name.lower() and name.isascii():
        return name
    return '"' + name.replace('"', '""') + '"'


def row_filter_issues(spec: TableSpec, info: TableInfo, version: int) -> list[str]:
    """Return why the table's row filter cannot work here (empty when it can)."""
    if spec.row_filter is None:
        return []
    if version < _ROW_FILTER_MIN_VERSION:
        return [f"row filters need PostgreSQL 15 or newer; the server is {version // 10000}"]
    check_row_filter(spec.row_filter, info.column_names, key=_filter_key(spec))
    if info.replica_identity == "f":
        return []
    outside = sorted(referenced_columns(spec.row_filter) - set(info.identity_columns))
    if not outside:
        return []
    return [
        f"the row filter uses {', '.join(outside)}, which {'is' if len(outside) == 1 else 'are'} not "
        f"in the replica identity ({', '.join(info.identity_columns) or 'none'}); PostgreSQL would then "
        f"refuse every UPDATE and DELETE on the table. Fix: ALTER TABLE {_quote(spec.schema)}."
        f"{_quote(spec.table)} REPLICA IDENTITY FULL; or filter only on key columns"
    ]


def _filter_key(spec: TableSpec) -> str:
    return f"tables.{spec.qualified_name}.row_filter"


def server_version(conn: psycopg.Connection) -> int:
    """Return the server's version number (e.g. 150018)."""
    return int(conn.info.server_version)


def ensure(
    conn: psycopg.Connection,
    *,
    slot: str,
    publication: str,
    origin: str,
    tables: Sequence[TableSpec],
    dry_run: bool,
) -> list[str]:
    """Create or realign publication, slot and origin; return the SQL run (or, dry, to run).

    A second call with the same arguments returns ``[]``. Raises ConfigError for tables or
    row filters that cannot work (naming the fix), PermanentError for a foreign slot.
    """
    if not tables:
        raise ConfigError([ConfigIssue(file="", key="tables", reason="no tables are mapped")])
    version = server_version(conn)
    with _autocommit(conn), classify_pg(f"syncagent init (slot {slot})"):
        publication_sql = _publication_statements(conn, publication, tables, version)
        slot_sql = _slot_statements(conn, slot)
        origin_sql = _origin_statements(conn, origin)
        statements = publication_sql + slot_sql + origin_sql
        if not dry_run:
            for stmt in statements:
                logger.info("event=pg_init_statement slot=%s statement=%s", slot, " ".join(stmt.split()[:3]))
                conn.execute(stmt.encode())
    return statements


def _publication_statements(
    conn: psycopg.Connection, publication: str, tables: Sequence[TableSpec], version: int
) -> list[str]:
    issues: list[ConfigIssue] = []
    members: list[sql.Composable] = []
    spec_parts: list[str] = []
    for spec in sorted(tables, key=lambda t: (t.schema, t.table)):
        info = describe_table(conn, spec.schema, spec.table)
        key = f"tables.{spec.qualified_name}"
        if info is None:
            issues.append(ConfigIssue("", key, f"table {spec.qualified_name} does not exist"))
            continue
        if info.replica_identity == "n" or not info.identity_columns:
            issues.append(
                ConfigIssue(
                    "",
                    key,
                    f"table {spec.qualified_name} has no primary key or replica identity, so PostgreSQL "
                    f"would refuse its UPDATEs and DELETEs once published. Fix: {identity_fix(spec)}",
                )
            )
            continue
        try:
            problems = row_filter_issues(spec, info, version)
        except ConfigError as exc:
            issues.extend(exc.errors)
            continue
        issues.extend(ConfigIssue("", _filter_key(spec), p) for p in problems)
        member: sql.Composable = sql.SQL("{}.{}").format(
            sql.Identifier(spec.schema), sql.Identifier(spec.table)
        )
        normalised = None
        if spec.row_filter is not None:
            normalised = check_row_filter(spec.row_filter, info.column_names, key=_filter_key(spec))
            member = sql.SQL("{} WHERE ({})").format(member, sql.SQL(normalised))
        members.append(member)
        spec_parts.append(f"{spec.schema}\x00{spec.table}\x00{normalised or ''}")
    if issues:
        raise ConfigError(issues)
    digest = hashlib.sha256("\x01".join(spec_parts).encode()).hexdigest()[:32]
    comment = sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
        sql.Identifier(publication), sql.Literal(_SPEC_MARK + digest)
    )
    table_list = sql.SQL(", ").join(members)
    exists = conn.execute(
        "SELECT obj_description(oid, 'pg_publication'), puballtables FROM pg_publication WHERE pubname = %s",
        (publication,),
    ).fetchone()
    if exists is None:
        create = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(publication), table_list)
        return [create.as_string(conn), comment.as_string(conn)]
    if exists[1]:
        raise PermanentError(
            f"publication {publication!r} is FOR ALL TABLES, so syncagent cannot manage its table list. "
            "Fix: choose another publication name in the config, or drop it"
        )
    current = {
        (s, t)
        for s, t in conn.execute(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    }
    wanted = {(t.schema, t.table) for t in tables}
    if current == wanted and exists[0] == _SPEC_MARK + digest:
        return []
    alter = sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(publication), table_list)
    return [alter.as_string(conn), comment.as_string(conn)]


def _slot_statements(conn: psycopg.Connection, slot: str) -> list[str]:
    row = conn.execute(
        "SELECT plugin, slot_type, database FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is None:
        stmt = sql.SQL("SELECT pg_create_logical_replication_slot({}, {})").format(
            sql.Literal(slot), sql.Literal(PLUGIN)
        )
        return [stmt.as_string(conn)]
    plugin, slot_type, database = row
    if slot_type != "logical" or plugin != PLUGIN:
        raise PermanentError(
            f"replication slot {slot!r} already exists as a {slot_type} slot with plugin {plugin!r}, "
            f"not {PLUGIN!r}. Fix: choose another slot name in the config, or drop that slot "
            f"(SELECT pg_drop_replication_slot('{slot}')) if nothing else uses it"
        )
    if database != conn.info.dbname:
        raise PermanentError(
            f"replication slot {slot!r} belongs to database {database!r}, not {conn.info.dbname!r}. "
            "Fix: choose another slot name in the config"
        )
    return []


def _origin_statements(conn: psycopg.Connection, origin: str) -> list[str]:
    row = conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)).fetchone()
    if row is not None:
        return []
    stmt = sql.SQL("SELECT pg_replication_origin_create({})").format(sql.Literal(origin))
    return [stmt.as_string(conn)]


def slot_lag(conn: psycopg.Connection, slot: str) -> SlotLag:
    """Return the slot's lag; raises CursorUnavailable if it is missing or invalidated."""
    version = server_version(conn)
    wal_status = "wal_status" if version >= 130000 else "NULL::text"
    query = (
        "SELECT confirmed_flush_lsn::text, restart_lsn::text, pg_current_wal_lsn()::text, "
        "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::int8, "
        "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, "
        f"{wal_status}, active FROM pg_replication_slots WHERE slot_name = %s"
    )
    with classify_pg(f"read lag of slot {slot}"):
        row = conn.execute(query, (slot,)).fetchone()
    if row is None:
        raise _slot_missing(slot)
    confirmed, restart, current, retained, pending, status, active = row
    if status == "lost" or restart is None:
        raise CursorUnavailable(
            f"replication slot {slot!r} was invalidated (the WAL it needed was removed, wal_status "
            f"{status or 'unknown'}). Fix: drop it (SELECT pg_drop_replication_slot('{slot}')), run "
            "`syncagent init` and a resync (`syncagent checkpoint rewind`)"
        )
    return SlotLag(
        confirmed_flush_lsn=confirmed or "0/0",
        restart_lsn=restart,
        current_lsn=current,
        retained_bytes=max(0, int(retained)),
        pending_bytes=max(0, int(pending)),
        wal_status=status,
        active=bool(active),
    )


def _slot_missing(slot: str) -> CursorUnavailable:
    return CursorUnavailable(
        f"replication slot {slot!r} does not exist; the changes it held are lost. "
        "Fix: run `syncagent init` and a resync (`syncagent checkpoint rewind`)"
    )


def confirmed_flush(conn: psycopg.Connection, slot: str) -> int:
    """Return the slot's confirmed_flush_lsn; raises CursorUnavailable if the slot is gone."""
    with classify_pg(f"read slot {slot}"):
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    if row is None:
        raise _slot_missing(slot)
    return str_to_lsn(row[0]) if row[0] else 0


def advance(conn: psycopg.Connection, slot: str, lsn: int) -> bool:
    """Move the slot's confirmed position to ``lsn`` if that is forward; return whether it moved."""
    if lsn <= confirmed_flush(conn, slot):
        return False
    with _autocommit(conn), classify_pg(f"advance slot {slot}"):
        conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (slot, lsn_to_str(lsn)))
    logger.info("event=pg_slot_advanced slot=%s lsn=%s", slot, lsn_to_str(lsn))
    return True


class PeekCursor:
    """One poll's peek: a named server-side cursor over the slot's changes, read chunk by chunk.

    The peek is bounded by ``upto_lsn`` = min(flush LSN, confirmed_flush + max_poll_bytes),
    never by ``upto_nchanges``: every SQL call re-decodes from the slot's restart_lsn, so one
    call per poll is the cheap way, and the named cursor keeps client memory to one chunk.
    """

    def __init__(self, conn: psycopg.Connection, *, slot: str, publication: str, max_poll_bytes: int) -> None:
        self._conn = conn
        self._slot = slot
        with classify_pg(f"start peek of slot {slot}"):
            conn.autocommit = False
            # The flush LSN, not the insert LSN: decoding stops at the flush position, and a
            # position beyond it must never be taken as "read up to here".
            row = conn.execute(
                "SELECT confirmed_flush_lsn::text, pg_current_wal_flush_lsn()::text "
                "FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            if row is None:
                conn.rollback()
                raise _slot_missing(slot)
            self.confirmed_flush = str_to_lsn(row[0]) if row[0] else 0
            current = str_to_lsn(row[1])
            self.upto_lsn = max(self.confirmed_flush, min(current, self.confirmed_flush + max_poll_bytes))
            # More WAL waits past this poll's cap (a catch-up, or one huge transaction).
            self.capped = current > self.upto_lsn
            self._cursor: psycopg.ServerCursor | None = None
            # No new WAL: skip the call, which would still re-decode from restart_lsn.
            if self.upto_lsn > self.confirmed_flush:
                self._cursor = conn.cursor(name=f"syncagent_peek_{slot}", binary=True)
                self._cursor.execute(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, NULL, "
                    "'proto_version', '1', 'publication_names', %s)",
                    (slot, lsn_to_str(self.upto_lsn), sql.Identifier(publication).as_string(conn)),
                )
        self.closed = False

    def fetch(self, n: int) -> list[bytes]:
        """Return up to ``n`` more messages (raw pgoutput bytes); an empty list when exhausted."""
        if self._cursor is None:
            return []
        with classify_pg(f"peek slot {self._slot}"):
            rows = self._cursor.fetchmany(n)
        return [r[0] for r in rows]

    def close(self) -> None:
        """Close the server cursor and end its transaction (peeking never changes the slot)."""
        if self.closed:
            return
        self.closed = True
        try:
            with classify_pg(f"close peek of slot {self._slot}"):
                if not self._conn.closed:
                    if self._cursor is not None:
                        self._cursor.close()
                    self._conn.rollback()
        finally:
            if not self._conn.closed:
                self._conn.autocommit = True


def drop(conn: psycopg.Connection, slot: str, publication: str, origin: str) -> list[str]:
    """Drop slot, publication and origin where they exist; return the SQL run."""
    done: list[str] = []
    with _autocommit(conn), classify_pg(f"drop slot {slot}"):
        if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
            stmt = sql.SQL("SELECT pg_drop_replication_slot({})").format(sql.Literal(slot)).as_string(conn)
            conn.execute(stmt.encode())
            done.append(stmt)
        if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (publication,)).fetchone():
            stmt = sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(publication)).as_string(conn)
            conn.execute(stmt.encode())
            done.append(stmt)
        if conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (origin,)).fetchone():
            stmt = (
                sql.SQL("SELECT pg_replication_origin_drop({})").format(sql.Literal(origin)).as_string(conn)
            )
            conn.execute(stmt.encode())
            done.append(stmt)
    return done

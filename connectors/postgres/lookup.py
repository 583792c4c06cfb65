"""Read the current rows of a mapped table by key: what reconciliation compares.

One keyed ``SELECT`` per call (``key = ANY(...)``, cast to the key column's type so the
primary-key index serves it), read in text format and converted by the same converters as
the WAL stream, so a fetched row carries exactly the values a captured insert would carry.
The table's row filter applies: a row the publication no longer sends counts as absent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from agent.errors import PermanentError
from connectors.postgres.errors import classify_pg
from connectors.postgres.filters import check_row_filter
from connectors.postgres.slot import TableSpec, describe_table, open_session
from connectors.postgres.values import Converter, PgValueError, converter_for

logger = logging.getLogger(__name__)

_KEY_TYPE_SQL = (
    "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a"
    " WHERE a.attrelid = %s AND a.attname = %s AND NOT a.attisdropped"
)


class _TextLoader(Loader):
    """Loads a column as the server's text, for the pgoutput converters."""

    def load(self, data: Any) -> str:
        return bytes(data).decode()


@dataclass(frozen=True, slots=True)
class _Plan:
    """The keyed query of one table, its column names, converters and type OIDs."""

    query: sql.Composed
    names: tuple[str, ...]
    converters: tuple[Converter | None, ...]
    oids: frozenset[int]
    key_index: int


class RowLookup:
    """Fetches rows of the mapped tables by key over one lazily opened session."""

    def __init__(self, connect: Callable[[], psycopg.Connection], tables: Sequence[TableSpec]) -> None:
        self._connect = connect
        self._tables = {t.qualified_name: t for t in tables}
        self._conn: psycopg.Connection | None = None
        self._plans: dict[tuple[str, str | None], _Plan] = {}

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return ``{id: row}`` for ``ids`` of table ``object_name``; ``None`` where no row has the key."""
        return self._fetch(object_name, ids, None)

    def fetch_by(
        self, object_name: str, field: str, values: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """Return ``{value: row}`` of the rows whose column ``field`` holds each value (an external id)."""
        return self._fetch(object_name, values, field)

    def _fetch(
        self, object_name: str, ids: Sequence[str], column: str | None
    ) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        if not ids:
            return out
        spec = self._tables.get(object_name)
        if spec is None:
            raise PermanentError(
                f"table {object_name} is not mapped. Fix: map it, or reconcile another entity"
            )
        conn = self._connection()
        try:
            plan = self._plan(conn, spec, column)
            with classify_pg(f"fetch rows of {object_name}"):
                cur = conn.cursor()
                for oid in plan.oids:
                    cur.adapters.register_loader(oid, _TextLoader)
                rows = cur.execute(plan.query, (list(dict.fromkeys(ids)),)).fetchall()
        except BaseException:
            self.close()
            raise
        for row in rows:
            if row[plan.key_index] in out:
                out[row[plan.key_index]] = self._row(object_name, plan, row)
        return out

    def close(self) -> None:
        """Close the session, if open."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.close()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = open_session(self._connect, "connect for row lookup")
        return self._conn

    def _plan(self, conn: psycopg.Connection, spec: TableSpec, column: str | None) -> _Plan:
        plan = self._plans.get((spec.qualified_name, column))
        if plan is not None:
            return plan
        info = describe_table(conn, spec.schema, spec.table)
        if info is None:
            raise PermanentError(
                f"table {spec.qualified_name} does not exist. Fix: correct the table mapping"
            )
        keys = (column,) if column else spec.key_columns or info.primary_key
        if len(keys) != 1:
            raise PermanentError(
                f"table {spec.qualified_name}: a lookup needs exactly one key column, found {len(keys)}. "
                "Fix: set the entity's key to one column"
            )
        names = info.column_names
        if keys[0] not in names:
            raise PermanentError(f"table {spec.qualified_name} has no column {keys[0]}. Fix: correct the key")
        with classify_pg(f"read key type of {spec.qualified_name}"):
            found = conn.execute(_KEY_TYPE_SQL, (info.oid, keys[0])).fetchone()
            typnames: dict[int, str] = dict(
                conn.execute(
                    "SELECT oid::int8, typname::text FROM pg_type WHERE oid = ANY(%s)",
                    ([oid for _, oid in info.columns],),
                ).fetchall()
            )
        assert found is not None
        where: list[sql.Composable] = [
            # The catalog's own spelling of the type (quoted where it must be): no user input.
            sql.SQL("{} = ANY(%s::text[]::{}[])").format(sql.Identifier(keys[0]), sql.SQL(found[0]))
        ]
        if spec.row_filter:
            normalised = check_row_filter(
                spec.row_filter, names, key=f"tables.{spec.qualified_name}.row_filter"
            )
            where.append(sql.SQL("({})").format(sql.SQL(normalised)))
        query = sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
            sql.SQL(", ").join(sql.Identifier(n) for n in names),
            sql.Identifier(spec.schema),
            sql.Identifier(spec.table),
            sql.SQL(" AND ").join(where),
        )
        plan = _Plan(
            query=query,
            names=names,
            converters=tuple(converter_for(oid, typnames.get(oid)) for _, oid in info.columns),
            oids=frozenset(oid for _, oid in info.columns),
            key_index=names.index(keys[0]),
        )
        self._plans[(spec.qualified_name, column)] = plan
        return plan

    def _row(self, table: str, plan: _Plan, row: Sequence[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, conv, v in zip(plan.names, plan.converters, row, strict=True):
            if conv is not None and v is not None:
                try:
                    v = conv(v)
                except PgValueError:
                    logger.warning("event=pg_value_kept_as_text table=%s column=%s", table, name)
            out[name] = v
        return out

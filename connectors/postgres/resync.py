"""Resync of mapped tables: re-read rows as ``read`` changes, keyset-paged, resumable.

A slot cannot move backwards, so "rewind" for PostgreSQL means reading the tables again.
Pages follow the primary key (``WHERE (pk) > (last) ORDER BY pk LIMIT n``, never OFFSET),
each in its own short transaction so no snapshot is held for the whole run. Rows are read
in text format and converted by the same converters as the WAL stream, so a ``read`` change
carries exactly the values an insert of that row would have carried.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.adapt import Loader

from agent.errors import ConfigError, ConfigIssue, PermanentError
from agent.model import Batch, Change, Cursor
from connectors.postgres.errors import classify_pg
from connectors.postgres.filters import check_row_filter
from connectors.postgres.slot import TableInfo, TableSpec, describe_table, identity_fix, open_session
from connectors.postgres.values import Converter, PgValueError, converter_for

__all__ = ["resync_batches"]

logger = logging.getLogger(__name__)

CURSOR_VERSION = 1


class _TextLoader(Loader):
    """Loads a text-format column as the server's text, for the same converters as pgoutput."""

    def load(self, data: Any) -> str:
        return bytes(data).decode()


def resync_batches(
    connect: Callable[[], psycopg.Connection],
    *,
    source: str,
    change_stream: str,
    tables: Sequence[TableSpec],
    stream: str,
    since: datetime | None,
    after_key: str | None,
    chunk: int,
) -> Iterator[Batch]:
    """Yield batches of ``read`` changes for ``stream`` ("schema.table" or "*"), ``chunk`` rows each.

    Each batch's cursor holds ``resync_table`` and ``after_key``: passing that ``after_key``
    back (same ``stream``) resumes after the batch. ``since`` keeps rows whose
    ``updated_at_column`` is at or after it. The last batch has ``more=False``.
    """
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    specs = _specs(tables, stream)
    resume_table, resume_key = _parse_after_key(stream, after_key)
    if resume_table is not None:
        names = [s.qualified_name for s in specs]
        if resume_table not in names:
            raise ConfigError([ConfigIssue("", "after_key", f"table {resume_table} is not mapped")])
        specs = specs[names.index(resume_table) :]
    reader = _Reader(source, change_stream, stream, since, chunk, token=uuid.uuid4().hex[:12])
    conn = open_session(connect, f"connect for resync of {stream}")
    try:
        for n, spec in enumerate(specs):
            start = resume_key if spec.qualified_name == resume_table else None
            yield from reader.table(conn, spec, start, last_table=n == len(specs) - 1)
    finally:
        conn.close()


def _specs(tables: Sequence[TableSpec], stream: str) -> list[TableSpec]:
    if stream == "*":
        return list(tables)
    by_name = {t.qualified_name: t for t in tables}
    if stream not in by_name:
        known = ", ".join(by_name) or "none"
        raise ConfigError([ConfigIssue("", "stream", f"{stream} is not a mapped table (mapped: {known})")])
    return [by_name[stream]]


class _Reader:
    """One resync run: its token (so a second run journals again) and its options."""

    def __init__(
        self, source: str, change_stream: str, stream: str, since: datetime | None, chunk: int, token: str
    ) -> None:
        self.source = source
        self.change_stream = change_stream
        self.stream = stream
        self.since = since
        self.chunk = chunk
        self.token = token

    def table(
        self, conn: psycopg.Connection, spec: TableSpec, after: list[str] | None, *, last_table: bool
    ) -> Iterator[Batch]:
        """Yield the batches of one table, after key ``after`` (None: from its first row)."""
        info = describe_table(conn, spec.schema, spec.table)
        if info is None:
            raise PermanentError(
                f"table {spec.qualified_name} does not exist. Fix: correct the table mapping"
            )
        keys = spec.key_columns or info.primary_key
        if not keys:
            raise PermanentError(
                f"table {spec.qualified_name} has no primary key to page by. Fix: set key_columns "
                f"in its mapping, or {identity_fix(spec)}"
            )
        if self.since is not None and not spec.updated_at_column:
            raise ConfigError(
                [
                    ConfigIssue(
                        "",
                        f"tables.{spec.qualified_name}.updated_at_column",
                        "a resync since a time needs the table's modification column",
                    )
                ]
            )
        names = info.column_names
        converters = _converters(conn, info)
        key_pos = [names.index(k) for k in keys]
        query = self._query(spec, names, keys)
        while True:
            params: dict[str, Any] = {"since": self.since}
            params.update({f"k{i}": v for i, v in enumerate(after or ())})
            with classify_pg(f"resync {spec.qualified_name}"), conn.transaction():
                meta = conn.execute("SELECT now(), pg_current_wal_lsn()::text").fetchone()
                cur = conn.cursor()
                for oid in {oid for _, oid in info.columns}:
                    cur.adapters.register_loader(oid, _TextLoader)
                rows = cur.execute(query[after is not None], params).fetchall()
            assert meta is not None
            snapshot_ts, wal_lsn = meta
            has_more = len(rows) > self.chunk
            rows = rows[: self.chunk]
            changes = [
                self._change(spec, names, converters, keys, key_pos, row, snapshot_ts, wal_lsn)
                for row in rows
            ]
            if rows:
                after = [rows[-1][i] for i in key_pos]
            yield Batch(changes, self._cursor(spec, after), more=has_more or not last_table)
            if not has_more:
                return

    def _query(
        self, spec: TableSpec, names: tuple[str, ...], keys: tuple[str, ...]
    ) -> tuple[sql.Composed, ...]:
        """Return the page query without and with the keyset condition."""
        where: list[sql.Composable] = []
        if spec.row_filter:
            # Only rows the publication sends: the filter was checked by init, check it again.
            normalised = check_row_filter(
                spec.row_filter, names, key=f"tables.{spec.qualified_name}.row_filter"
            )
            where.append(sql.SQL("({})").format(sql.SQL(normalised)))
        if self.since is not None:
            where.append(sql.SQL("{} >= %(since)s").format(sql.Identifier(spec.updated_at_column or "")))
        key_list = sql.SQL(", ").join(sql.Identifier(k) for k in keys)
        after = sql.SQL("({}) > ({})").format(
            key_list, sql.SQL(", ").join(sql.Placeholder(f"k{i}") for i in range(len(keys)))
        )
        out = []
        for conditions in (where, [*where, after]):
            out.append(
                sql.SQL("SELECT {} FROM {}.{}{} ORDER BY {} LIMIT {}").format(
                    sql.SQL(", ").join(sql.Identifier(n) for n in names),
                    sql.Identifier(spec.schema),
                    sql.Identifier(spec.table),
                    sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL(""),
                    key_list,
                    sql.Literal(self.chunk + 1),
                )
            )
        return tuple(out)

    def _change(
        self,
        spec: TableSpec,
        names: tuple[str, ...],
        converters: tuple[Converter | None, ...],
        keys: tuple[str, ...],
        key_pos: list[int],
        row: tuple[Any, ...],
        snapshot_ts: datetime,
        wal_lsn: str,
    ) -> Change:
        values = []
        for name, conv, v in zip(names, converters, row, strict=True):
            if conv is not None and v is not None:
                try:
                    v = conv(v)
                except PgValueError:
                    logger.warning(
                        "event=pg_value_kept_as_text table=%s column=%s", spec.qualified_name, name
                    )
            values.append(v)
        pk_text = json.dumps([row[i] for i in key_pos], separators=(",", ":"))
        return Change(
            source=self.source,
            stream=self.change_stream,
            object_name=spec.qualified_name,
            op="read",
            key={k: values[i] for k, i in zip(keys, key_pos, strict=True)},
            fields=dict(zip(names, values, strict=True)),
            position=f"resync:{self.token}:{spec.qualified_name}:{pk_text}:{snapshot_ts.isoformat()}",
            version=wal_lsn,
            source_ts=snapshot_ts,
        )

    def _cursor(self, spec: TableSpec, after: list[str] | None) -> Cursor:
        resume = None if after is None else json.dumps(after, separators=(",", ":"))
        if self.stream == "*" and after is not None:
            resume = json.dumps({"table": spec.qualified_name, "key": after}, separators=(",", ":"))
        return Cursor({"v": CURSOR_VERSION, "resync_table": spec.qualified_name, "after_key": resume})


def _converters(conn: psycopg.Connection, info: TableInfo) -> tuple[Converter | None, ...]:
    oids = [oid for _, oid in info.columns]
    with classify_pg(f"read column types of {info.schema}.{info.table}"):
        rows = conn.execute(
            "SELECT oid::int8, typname::text FROM pg_type WHERE oid = ANY(%s)", (oids,)
        ).fetchall()
    typnames = {int(oid): name for oid, name in rows}
    return tuple(converter_for(oid, typnames.get(oid)) for oid in oids)


def _parse_after_key(stream: str, after_key: str | None) -> tuple[str | None, list[str] | None]:
    if after_key is None:
        return None, None
    try:
        value = json.loads(after_key)
    except ValueError:
        raise ConfigError([ConfigIssue("", "after_key", "not the after_key of a resync cursor")]) from None
    if stream == "*":
        if not isinstance(value, dict) or not isinstance(value.get("key"), list):
            raise ConfigError(
                [ConfigIssue("", "after_key", 'for "*" it must be {"table": ..., "key": [...]}')]
            )
        return str(value.get("table")), [str(v) for v in value["key"]]
    if not isinstance(value, list):
        raise ConfigError([ConfigIssue("", "after_key", "it must be a JSON list of key values")])
    return stream, [str(v) for v in value]

"""Publication, slot and origin setup (ensure), lag, advance and drop on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from agent.errors import ConfigError, CursorUnavailable, PermanentError
from connectors.postgres.pgoutput import str_to_lsn
from connectors.postgres.slot import TableSpec, advance, drop, ensure, slot_lag

pytestmark = pytest.mark.pg

SCHEMA = """
CREATE TABLE public.orders (id bigint PRIMARY KEY, status text NOT NULL, amount numeric(12,2));
CREATE TABLE public.lines (order_id bigint, n int, sku text, PRIMARY KEY (order_id, n));
CREATE TABLE public.nokey (a int, b text);
CREATE TABLE public.unmapped (id serial PRIMARY KEY, payload text);
"""


class Names:
    """Cluster-wide names (slots and origins are per cluster) derived from the test database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        db = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        self.slot = f"slot_{db}"
        self.publication = f"pub_{db}"
        self.origin = f"origin_{db}"

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)


@pytest.fixture
def erp(pg_dsn: str) -> Iterator[Names]:
    names = Names(pg_dsn)
    with names.conn() as conn:
        conn.execute(SCHEMA)
    yield names
    with names.conn() as conn:
        drop(conn, names.slot, names.publication, names.origin)


def _ensure(erp: Names, tables: list[TableSpec], *, dry_run: bool = False) -> list[str]:
    with erp.conn() as conn:
        return ensure(
            conn,
            slot=erp.slot,
            publication=erp.publication,
            origin=erp.origin,
            tables=tables,
            dry_run=dry_run,
        )


ORDERS = TableSpec("public", "orders")
LINES = TableSpec("public", "lines")


def test_ensure_prints_exact_ddl_and_changes_nothing_when_dry_run(erp: Names) -> None:
    statements = _ensure(erp, [TableSpec("public", "orders", row_filter="id > 100"), LINES], dry_run=True)
    assert statements[0] == (
        f'CREATE PUBLICATION "{erp.publication}" FOR TABLE "public"."lines", '
        '"public"."orders" WHERE (id > 100)'
    )
    assert statements[1].startswith(f'COMMENT ON PUBLICATION "{erp.publication}" IS \'syncagent spec ')
    assert statements[2] == f"SELECT pg_create_logical_replication_slot('{erp.slot}', 'pgoutput')"
    assert statements[3] == f"SELECT pg_replication_origin_create('{erp.origin}')"
    with erp.conn() as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (erp.slot,)
        ).fetchone() == (0,)


def test_ensure_creates_everything_then_returns_nothing_when_run_again(erp: Names) -> None:
    tables = [TableSpec("public", "orders", row_filter="id <> 0"), LINES]
    first = _ensure(erp, tables)
    assert len(first) == 4
    assert _ensure(erp, tables) == []
    assert _ensure(erp, tables, dry_run=True) == []
    with erp.conn() as conn:
        plugin = conn.execute(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (erp.slot,)
        ).fetchone()
        assert plugin == ("pgoutput",)
        published = conn.execute(
            "SELECT tablename::text, rowfilter FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
            (erp.publication,),
        ).fetchall()
        assert published == [("lines", None), ("orders", "(id <> 0)")]
        assert conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (erp.origin,)).fetchone()


def test_ensure_alters_publication_when_tables_or_filter_change(erp: Names) -> None:
    _ensure(erp, [ORDERS])
    with erp.conn() as conn:
        conn.execute("ALTER TABLE public.orders REPLICA IDENTITY FULL")
    # a filter on a non-key column is fine under REPLICA IDENTITY FULL
    filtered = [TableSpec("public", "orders", row_filter="amount > 0"), LINES]
    again = _ensure(erp, filtered)
    assert again[0] == (
        f'ALTER PUBLICATION "{erp.publication}" SET TABLE '
        '"public"."lines", "public"."orders" WHERE (amount > 0)'
    )
    assert len(again) == 2  # slot and origin already exist
    assert _ensure(erp, filtered) == []
    assert _ensure(erp, [LINES])[0] == f'ALTER PUBLICATION "{erp.publication}" SET TABLE "public"."lines"'


def test_ensure_refuses_with_alter_table_fix_when_table_has_no_key(erp: Names) -> None:
    with pytest.raises(ConfigError) as info:
        _ensure(erp, [ORDERS, TableSpec("public", "nokey")])
    (issue,) = info.value.errors
    assert issue.key == "tables.public.nokey"
    assert "ALTER TABLE nokey" not in issue.reason
    assert "ALTER TABLE public.nokey REPLICA IDENTITY FULL" in issue.reason
    assert "ALTER TABLE public.nokey ADD PRIMARY KEY" in issue.reason


def test_ensure_refuses_before_postgres_would_when_filter_column_is_not_replica_identity(erp: Names) -> None:
    with pytest.raises(ConfigError) as info:
        _ensure(erp, [TableSpec("public", "orders", row_filter="status = 'open' AND id > 5")])
    (issue,) = info.value.errors
    assert issue.key == "tables.public.orders.row_filter"
    assert "status" in issue.reason and "REPLICA IDENTITY FULL" in issue.reason
    assert "id," not in issue.reason.split("uses")[1].split("which")[0]
    with erp.conn() as conn:
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
        # What the check prevents: PostgreSQL accepts such a publication, then breaks the ERP.
        conn.execute("INSERT INTO public.orders VALUES (1, 'open', 1)")
        conn.execute("CREATE PUBLICATION probe FOR TABLE public.orders WHERE (status = 'open')")
        with pytest.raises(psycopg.errors.InvalidColumnReference):
            conn.execute("UPDATE public.orders SET amount = 2")
        conn.execute("DROP PUBLICATION probe")


def test_ensure_collects_every_issue_when_several_tables_are_wrong(erp: Names) -> None:
    with pytest.raises(ConfigError) as info:
        _ensure(
            erp,
            [
                TableSpec("public", "missing"),
                TableSpec("public", "nokey"),
                TableSpec("public", "orders", row_filter="pg_sleep(1) IS NULL"),
            ],
        )
    keys = [e.key for e in info.value.errors]
    assert keys == ["tables.public.missing", "tables.public.nokey", "tables.public.orders.row_filter"]


def test_ensure_refuses_when_slot_name_is_taken_by_test_decoding(erp: Names) -> None:
    with erp.conn() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (erp.slot,))
    with pytest.raises(PermanentError) as info:
        _ensure(erp, [ORDERS])
    assert "test_decoding" in str(info.value) and erp.slot in str(info.value)


def test_slot_lag_reports_positions_and_bytes_when_slot_exists(erp: Names) -> None:
    _ensure(erp, [ORDERS])
    with erp.conn() as conn:
        conn.execute(
            "INSERT INTO public.unmapped (payload) SELECT repeat('x', 200) FROM generate_series(1, 500)"
        )
        lag = slot_lag(conn, erp.slot)
    assert lag.wal_status == "reserved"
    assert lag.active is False
    assert lag.pending_bytes > 100_000
    assert lag.retained_bytes >= lag.pending_bytes
    assert str_to_lsn(lag.current_lsn) > str_to_lsn(lag.confirmed_flush_lsn)


def test_slot_lag_raises_cursor_unavailable_with_fix_when_slot_is_missing(erp: Names) -> None:
    with erp.conn() as conn, pytest.raises(CursorUnavailable) as info:
        slot_lag(conn, erp.slot)
    assert erp.slot in str(info.value)
    assert "syncagent init" in str(info.value) and "syncagent checkpoint rewind" in str(info.value)


def test_advance_moves_only_forward_when_called_with_older_lsn(erp: Names) -> None:
    _ensure(erp, [ORDERS])
    with erp.conn() as conn:
        conn.execute("INSERT INTO public.orders VALUES (1, 'open', 1)")
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
        assert row is not None
        target = str_to_lsn(row[0])
        assert advance(conn, erp.slot, target) is True
        assert str_to_lsn(slot_lag(conn, erp.slot).confirmed_flush_lsn) == target
        assert advance(conn, erp.slot, target - 8) is False
        assert advance(conn, erp.slot, target) is False
        assert str_to_lsn(slot_lag(conn, erp.slot).confirmed_flush_lsn) == target


def test_drop_removes_slot_publication_and_origin_when_they_exist(erp: Names) -> None:
    _ensure(erp, [ORDERS])
    with erp.conn() as conn:
        done = drop(conn, erp.slot, erp.publication, erp.origin)
        assert len(done) == 3
        assert drop(conn, erp.slot, erp.publication, erp.origin) == []

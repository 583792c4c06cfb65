"""PostgresSource against a real PostgreSQL: capture, cursors at commit boundaries, resync, check."""

from __future__ import annotations

import json
import resource
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from agent.errors import CursorUnavailable
from agent.model import Batch, Change, Cursor
from connectors.base import Resync, Source
from connectors.postgres import PostgresSource, TableSpec, ensure
from connectors.postgres.pgoutput import Commit, Decoder, str_to_lsn

pytestmark = pytest.mark.pg

SCHEMA = """
CREATE TYPE public.mood AS ENUM ('happy', 'sad');
CREATE TABLE public.customers (
    id bigint PRIMARY KEY, name text, status text, amount numeric(12,2), notes text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE public.kinds (
    id int PRIMARY KEY, i2 smallint, i4 int, i8 bigint, n numeric, t text, b boolean, d date,
    ts timestamp, tstz timestamptz, u uuid, j json, jb jsonb, arr int[], tarr text[], by bytea,
    m public.mood, nul text
);
CREATE TABLE public.lines (order_id bigint, n int, sku text, PRIMARY KEY (order_id, n));
CREATE TABLE public.unmapped (id serial PRIMARY KEY, payload text);
CREATE TABLE public.nokey (a int, b text);
"""
CUSTOMERS = TableSpec("public", "customers", updated_at_column="updated_at")
KINDS = TableSpec("public", "kinds")
LINES = TableSpec("public", "lines")
BIG_TEXT = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 200))"


class Erp:
    """A fresh database with the ERP schema, and cluster-unique slot/publication/origin names."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        self.slot = f"slot_{self.dbname}"
        self.publication = f"pub_{self.dbname}"
        self.origin = f"origin_{self.dbname}"
        self.sources: list[PostgresSource] = []

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def sql(self, *statements: str) -> None:
        with self.conn() as conn:
            for stmt in statements:
                conn.execute(stmt)  # type: ignore[arg-type]

    def scalar(self, query: str) -> Any:
        with self.conn() as conn:
            row = conn.execute(query).fetchone()  # type: ignore[arg-type]
            assert row is not None
            return row[0]

    def init(self, tables: list[TableSpec]) -> None:
        with self.conn() as conn:
            ensure(
                conn,
                slot=self.slot,
                publication=self.publication,
                origin=self.origin,
                tables=tables,
                dry_run=False,
            )

    def source(
        self, tables: list[TableSpec] | None = None, *, init: bool = True, **kw: Any
    ) -> PostgresSource:
        tables = tables if tables is not None else [CUSTOMERS, KINDS, LINES]
        if init:
            self.init(tables)
        src = PostgresSource(
            "erp",
            lambda: psycopg.connect(self.dsn),
            slot=self.slot,
            publication=self.publication,
            origin=self.origin,
            tables=tables,
            **kw,
        )
        self.sources.append(src)
        return src

    def confirmed_flush(self) -> int:
        return str_to_lsn(
            self.scalar(
                f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{self.slot}'"
            )
        )

    def commit_ends(self) -> set[int]:
        """End LSNs of every transaction the slot would send (decoded independently)."""
        decoder = Decoder()
        with self.conn() as conn:
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                "'proto_version', '1', 'publication_names', %s)",
                (self.slot, self.publication),
            ).fetchall()
        return {m.end_lsn for m in map(decoder.decode, (r[0] for r in rows)) if isinstance(m, Commit)}


def drain(
    src: PostgresSource, cursor: Cursor | None = None, *, limit: int = 10_000
) -> tuple[list[Change], Cursor]:
    """Read one poll to the end, 'journaling' and committing every batch like the pipeline."""
    changes: list[Change] = []
    while True:
        batch = src.read("wal", cursor, limit=limit)
        changes.extend(batch.changes)
        cursor = batch.next_cursor
        src.commit("wal", cursor)
        if not batch.more:
            return changes, cursor


def test_postgres_source_satisfies_source_and_resync_protocols_when_built(erp: Erp) -> None:
    src = erp.source(init=False)
    assert isinstance(src, Source) and isinstance(src, Resync)
    assert src.streams() == ("wal",)


def test_read_captures_insert_update_delete_when_replica_identity_default(erp: Erp) -> None:
    src = erp.source()
    erp.sql(
        "INSERT INTO customers (id, name, status, amount) "
        "VALUES (1, 'Acme', 'new', 10.50), (2, 'Bolt', 'new', 2)",
        "UPDATE customers SET status = 'active' WHERE id = 1",
        "DELETE FROM customers WHERE id = 2",
    )
    changes, _ = drain(src)
    assert [(c.op, dict(c.key)) for c in changes] == [
        ("insert", {"id": 1}),
        ("insert", {"id": 2}),
        ("update", {"id": 1}),
        ("delete", {"id": 2}),
    ]
    first, _, update, delete = changes
    assert first.object_name == "public.customers" and first.stream == "wal" and first.source == "erp"
    assert first.fields["amount"] == Decimal("10.50") and first.fields["name"] == "Acme"
    assert isinstance(first.fields["updated_at"], datetime) and first.fields["updated_at"].tzinfo is not None
    assert update.fields["status"] == "active" and update.old_key is None
    assert dict(delete.fields) == {"id": 2}  # only the key is known under REPLICA IDENTITY DEFAULT
    assert first.position == f"{first.version}:0" and changes[1].position == f"{first.version}:1"
    assert update.position.endswith(":0") and update.version != first.version
    assert all(c.origin is None and c.unchanged == frozenset() for c in changes)
    assert all(isinstance(c.source_ts, datetime) for c in changes)


def test_read_sends_full_old_row_when_replica_identity_full(erp: Erp) -> None:
    erp.sql(
        "ALTER TABLE customers REPLICA IDENTITY FULL", "INSERT INTO customers (id, name) VALUES (7, 'Old')"
    )
    src = erp.source()
    erp.sql("UPDATE customers SET name = 'New' WHERE id = 7", "DELETE FROM customers WHERE id = 7")
    changes, _ = drain(src)
    update, delete = changes
    assert dict(update.key) == {"id": 7} and update.old_key is None  # key = primary key, not every column
    assert update.fields["name"] == "New"
    assert dict(delete.key) == {"id": 7}
    assert delete.fields["name"] == "New" and "updated_at" in delete.fields


def test_read_sets_old_key_when_update_changes_the_key(erp: Erp) -> None:
    erp.sql("INSERT INTO lines VALUES (1, 1, 'a')")
    src = erp.source()
    erp.sql("UPDATE lines SET n = 2 WHERE order_id = 1", "UPDATE lines SET sku = 'b'")
    changes, _ = drain(src)
    moved, plain = changes
    assert dict(moved.key) == {"order_id": 1, "n": 2}
    assert moved.old_key == {"order_id": 1, "n": 1}
    assert plain.old_key is None


def test_read_yields_one_truncate_per_table_when_truncate_covers_several(erp: Erp) -> None:
    erp.sql("INSERT INTO customers (id) VALUES (1)", "INSERT INTO lines VALUES (1, 1, 'a')")
    src = erp.source()
    erp.sql("TRUNCATE customers, lines")
    changes, _ = drain(src)
    assert sorted(c.object_name for c in changes) == ["public.customers", "public.lines"]
    assert all(c.op == "truncate" and dict(c.key) == {} for c in changes)
    assert len({c.position for c in changes}) == 2


def test_read_converts_column_types_when_values_are_typed(erp: Erp) -> None:
    src = erp.source()
    erp.sql(
        "INSERT INTO kinds VALUES (1, -32768, 2147483647, 9223372036854775807, "
        "12345678901234567890.000000001, "
        "'tëxt', true, '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15+02', "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.5]}', '{\"b\": null}', '{1,NULL,3}', "
        "'{\"x y\",z}', '\\x00ff10', 'sad', NULL)"
    )
    (change,) = drain(src)[0]
    f = change.fields
    assert f["i2"] == -32768 and f["i4"] == 2147483647 and f["i8"] == 9223372036854775807
    assert f["n"] == Decimal("12345678901234567890.000000001")
    assert f["t"] == "tëxt" and f["b"] is True
    assert f["d"] == date(2024, 2, 29)
    assert f["ts"] == datetime(2024, 2, 29, 13, 14, 15, 123456)
    assert f["tstz"] == datetime(2024, 2, 29, 11, 14, 15, tzinfo=UTC)
    assert str(f["u"]) == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert f["j"] == {"a": [1, Decimal("2.5")]} and f["jb"] == {"b": None}
    assert f["arr"] == [1, None, 3] and f["tarr"] == ["x y", "z"]
    assert f["by"] == b"\x00\xff\x10"
    assert f["m"] == "sad"
    assert f["nul"] is None and "nul" in f


def test_read_lists_unchanged_toast_column_and_omits_it_when_update_leaves_it(erp: Erp) -> None:
    erp.sql(f"INSERT INTO customers (id, name, notes) VALUES (1, 'a', {BIG_TEXT})")
    src = erp.source()
    erp.sql("UPDATE customers SET name = 'b' WHERE id = 1")
    (update,) = drain(src)[0]
    assert update.unchanged == frozenset({"notes"})
    assert "notes" not in update.fields
    assert update.fields["name"] == "b"


def test_read_follows_added_column_when_alter_table_comes_between_polls(erp: Erp) -> None:
    src = erp.source()
    erp.sql("INSERT INTO customers (id, name) VALUES (1, 'a')")
    before, cursor = drain(src)
    erp.sql(
        "ALTER TABLE customers ADD COLUMN region text", "INSERT INTO customers (id, region) VALUES (2, 'EU')"
    )
    after, _ = drain(src, cursor)
    assert "region" not in before[0].fields
    assert after[0].fields["region"] == "EU"


def test_read_follows_added_column_when_alter_table_is_inside_one_poll(erp: Erp) -> None:
    src = erp.source()
    erp.sql(
        "INSERT INTO customers (id, amount) VALUES (1, 1.25)",
        "ALTER TABLE customers ADD COLUMN score numeric",
        "INSERT INTO customers (id, amount, score) VALUES (2, 2.5, 9.75)",
    )
    changes, _ = drain(src)
    assert "score" not in changes[0].fields and changes[0].fields["amount"] == Decimal("1.25")
    assert changes[1].fields["score"] == Decimal("9.75") and changes[1].fields["amount"] == Decimal("2.5")


def test_read_tags_origin_when_written_in_an_origin_session(erp: Erp) -> None:
    src = erp.source()
    with erp.conn() as conn:
        conn.execute("SELECT pg_replication_origin_session_setup(%s)", (erp.origin,))
        conn.execute("INSERT INTO customers (id, name) VALUES (1, 'from the agent')")
        conn.execute("SELECT pg_replication_origin_session_reset()")
        conn.execute("INSERT INTO customers (id, name) VALUES (2, 'from a user')")
    erp.sql("UPDATE customers SET name = 'user again' WHERE id = 1")
    changes, _ = drain(src)
    assert [(c.key["id"], c.origin) for c in changes] == [(1, erp.origin), (2, None), (1, None)]


def test_read_returns_cursor_only_at_commit_boundaries_when_chunks_split_transactions(erp: Erp) -> None:
    src = erp.source(chunk_rows=7)
    start = erp.confirmed_flush()
    for n in range(4):
        erp.sql(f"INSERT INTO customers (id) SELECT g FROM generate_series({n * 10 + 1}, {n * 10 + 10}) g")
    ends = erp.commit_ends()
    cursor = None
    batches: list[Batch] = []
    while True:
        batch = src.read("wal", cursor, limit=10_000)
        batches.append(batch)
        cursor = batch.next_cursor
        if not batch.more:
            break
    assert sum(len(b.changes) for b in batches) == 40
    assert len(batches) > 4
    lsns = [str_to_lsn(b.next_cursor.data["lsn"]) for b in batches[:-1]]
    assert set(lsns) <= ends | {start}
    assert lsns[0] == start  # the first chunk (7 rows) ends inside the first transaction
    assert lsns == sorted(lsns)
    assert str_to_lsn(batches[-1].next_cursor.data["lsn"]) >= max(ends)


def test_read_returns_same_positions_when_repeeked_after_crash_without_commit(erp: Erp) -> None:
    src = erp.source(chunk_rows=5)
    erp.sql(
        "INSERT INTO customers (id) SELECT g FROM generate_series(1, 8) g",
        "UPDATE customers SET name = 'x' WHERE id < 4",
    )
    first = src.read("wal", None, limit=10_000)
    second = src.read("wal", first.next_cursor, limit=10_000)
    src.close()  # crash: nothing committed
    restarted = erp.source(chunk_rows=5, init=False)
    again, _ = drain(restarted, None)
    seen = [c.position for c in [*first.changes, *second.changes]]
    assert [c.position for c in again][: len(seen)] == seen
    assert len(again) == 11 and len({c.position for c in again}) == 11


def test_commit_advances_slot_when_peek_closes_and_not_before(erp: Erp) -> None:
    src = erp.source(chunk_rows=3)
    start = erp.confirmed_flush()
    erp.sql("INSERT INTO customers (id) VALUES (1)", "INSERT INTO customers (id) VALUES (2)")
    batch = src.read("wal", None, limit=10_000)
    assert batch.more
    src.commit("wal", batch.next_cursor)
    assert erp.confirmed_flush() == start  # peek still open: deferred
    changes, cursor = drain(src, batch.next_cursor)
    assert erp.confirmed_flush() == str_to_lsn(cursor.data["lsn"]) > start
    assert drain(src, cursor)[0] == []


def test_read_advances_slot_when_only_unmapped_tables_changed(erp: Erp) -> None:
    src = erp.source()
    _, cursor = drain(src)
    erp.sql("INSERT INTO unmapped (payload) SELECT repeat('w', 500) FROM generate_series(1, 2000)")
    erp.sql("CHECKPOINT")  # logs a running-xacts record, where restart_lsn may move to
    before = src.lag()
    assert before.pending_bytes > 1_000_000 and before.retained_bytes > 1_000_000
    changes, cursor = drain(src, cursor)
    assert changes == []
    after = src.lag()
    assert str_to_lsn(after.confirmed_flush_lsn) > str_to_lsn(before.confirmed_flush_lsn)
    assert after.pending_bytes < before.pending_bytes // 10
    assert after.retained_bytes < before.retained_bytes // 10


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so a peak is measured from here."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def test_read_keeps_python_memory_bounded_when_one_transaction_has_200k_rows(erp: Erp) -> None:
    src = erp.source()
    erp.sql(
        "INSERT INTO customers (id, name, amount) "
        "SELECT g, 'customer ' || g, g / 100.0 FROM generate_series(1, 200000) g"
    )
    resettable = _reset_peak_rss()
    rss_before = _rss_kib("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cursor: Cursor | None = None
    count = 0
    last_index = -1
    batches = 0
    while True:
        batch = src.read("wal", cursor, limit=10_000)
        batches += 1
        for c in batch.changes:  # positions continue across the chunks of the one transaction
            index = int(c.position.rsplit(":", 1)[1])
            assert index == last_index + 1
            last_index = index
        count += len(batch.changes)
        if batch.more:
            assert batch.next_cursor == cursor or cursor is None  # never a mid-transaction LSN
        cursor = batch.next_cursor
        src.commit("wal", cursor)
        if not batch.more:
            break
    peak = _rss_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth_mib = (peak - rss_before) / 1024
    print(f"200k-row transaction: {batches} chunks, peak RSS growth {growth_mib:.1f} MiB")
    assert count == 200_000
    assert batches >= 20
    # Holding the transaction whole would take hundreds of MiB; one 10k chunk takes a few.
    assert growth_mib < 60


def test_read_raises_cursor_unavailable_with_fix_when_slot_was_dropped(erp: Erp) -> None:
    src = erp.source()
    erp.sql(f"SELECT pg_drop_replication_slot('{erp.slot}')")
    with pytest.raises(CursorUnavailable) as info:
        src.read("wal", None, limit=100)
    assert erp.slot in str(info.value)
    assert "syncagent init" in str(info.value) and "syncagent checkpoint rewind" in str(info.value)


def test_read_raises_cursor_unavailable_when_checkpoint_is_behind_the_slot(erp: Erp) -> None:
    src = erp.source()
    erp.sql("INSERT INTO customers (id) VALUES (1)")
    _, cursor = drain(src)
    with pytest.raises(CursorUnavailable) as info:
        src.read("wal", Cursor({"v": 1, "lsn": "0/1"}), limit=100)
    assert "resync" in str(info.value)
    assert src.read("wal", cursor, limit=100).changes == []


def test_oldest_unconsumed_at_tracks_first_uncommitted_transaction_when_polling(erp: Erp) -> None:
    src = erp.source()
    assert src.oldest_unconsumed_at() is None
    erp.sql("INSERT INTO customers (id) VALUES (1)")
    batch = src.read("wal", None, limit=100)
    seen = src.oldest_unconsumed_at()
    assert seen is not None and seen == batch.changes[0].source_ts
    src.commit("wal", batch.next_cursor)
    assert src.oldest_unconsumed_at() is None


# -- resync -------------------------------------------------------------------------------------


def _resync_all(src: PostgresSource, stream: str, **kw: Any) -> list[Batch]:
    return list(src.resync(stream, since=kw.pop("since", None), after_key=kw.pop("after_key", None), **kw))


def test_resync_pages_by_key_when_table_is_larger_than_a_chunk(erp: Erp) -> None:
    erp.sql(
        "INSERT INTO customers (id, name, amount) SELECT g, 'c' || g, g * 1.5 FROM generate_series(1, 10) g"
    )
    src = erp.source()
    batches = _resync_all(src, "public.customers", chunk=4)
    assert [len(b.changes) for b in batches] == [4, 4, 2]
    assert [b.more for b in batches] == [True, True, False]
    changes = [c for b in batches for c in b.changes]
    assert [c.key["id"] for c in changes] == list(range(1, 11))
    assert all(c.op == "read" and c.object_name == "public.customers" for c in changes)
    assert changes[2].fields["amount"] == Decimal("4.50")
    assert batches[0].next_cursor.data == {"v": 1, "resync_table": "public.customers", "after_key": '["4"]'}
    again = [c.position for b in _resync_all(src, "public.customers", chunk=4) for c in b.changes]
    assert not set(again) & {c.position for c in changes}  # a second run journals again


def test_resync_reads_only_rows_changed_since_when_since_given(erp: Erp) -> None:
    erp.sql(
        "INSERT INTO customers (id, updated_at) "
        "SELECT g, now() - interval '10 days' FROM generate_series(1, 5) g",
        "UPDATE customers SET updated_at = now() WHERE id IN (2, 4)",
    )
    src = erp.source()
    since = datetime.now(UTC) - timedelta(days=1)
    changes = [c for b in _resync_all(src, "public.customers", since=since) for c in b.changes]
    assert [c.key["id"] for c in changes] == [2, 4]


def test_resync_resumes_after_key_when_given_a_cursor_of_an_earlier_run(erp: Erp) -> None:
    erp.sql("INSERT INTO lines SELECT o, n, 's' FROM generate_series(1, 3) o, generate_series(1, 3) n")
    src = erp.source()
    first = next(iter(src.resync("public.lines", since=None, after_key=None, chunk=4)))
    resumed = _resync_all(src, "public.lines", after_key=first.next_cursor.data["after_key"], chunk=4)
    keys = [(c.key["order_id"], c.key["n"]) for b in resumed for c in b.changes]
    assert keys == [(2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]


def test_resync_walks_every_mapped_table_when_stream_is_star(erp: Erp) -> None:
    erp.sql(
        "INSERT INTO customers (id) VALUES (1), (2)",
        "INSERT INTO kinds (id, b, arr) VALUES (1, false, '{4,5}')",
        "INSERT INTO lines VALUES (1, 1, 'x')",
    )
    src = erp.source()
    batches = _resync_all(src, "*", chunk=1)
    names = [c.object_name for b in batches for c in b.changes]
    assert names == ["public.customers", "public.customers", "public.kinds", "public.lines"]
    assert [b.more for b in batches][-1] is False and all(b.more for b in batches[:-1])
    kinds = next(c for b in batches for c in b.changes if c.object_name == "public.kinds")
    assert kinds.fields["b"] is False and kinds.fields["arr"] == [4, 5]
    resume = json.loads(batches[1].next_cursor.data["after_key"])
    assert resume == {"table": "public.customers", "key": ["2"]}
    rest = _resync_all(src, "*", after_key=batches[1].next_cursor.data["after_key"], chunk=10)
    assert [c.object_name for b in rest for c in b.changes] == ["public.kinds", "public.lines"]


# -- check ----------------------------------------------------------------------------------------


def _errors(src: PostgresSource) -> list[str]:
    return [f"{p.subject}: {p.message} | {p.fix}" for p in src.check() if p.severity == "error"]


def test_check_reports_no_errors_when_initialised(erp: Erp) -> None:
    src = erp.source()
    assert _errors(src) == []
    infos = [p for p in src.check() if p.severity == "info"]
    assert any("REPLICA IDENTITY DEFAULT (id)" in p.message for p in infos)


def test_check_says_run_init_when_publication_slot_and_origin_are_missing(erp: Erp) -> None:
    src = erp.source(init=False)
    errors = _errors(src)
    assert len(errors) == 3
    assert all("syncagent init" in e for e in errors)


def test_check_gives_alter_table_fix_when_table_has_no_primary_key(erp: Erp) -> None:
    src = erp.source([CUSTOMERS, TableSpec("public", "nokey")], init=False)
    nokey = [e for e in _errors(src) if e.startswith("table public.nokey")]
    assert len(nokey) == 1
    assert "ALTER TABLE public.nokey REPLICA IDENTITY FULL" in nokey[0]


def test_check_names_host_and_port_when_database_does_not_exist(erp: Erp) -> None:
    params = psycopg.conninfo.conninfo_to_dict(erp.dsn)
    bad = psycopg.conninfo.make_conninfo(erp.dsn, dbname="no_such_db", password="s3cret-pw")
    src = PostgresSource(
        "erp", lambda: psycopg.connect(bad), slot="s", publication="p", origin="o", tables=[CUSTOMERS]
    )
    (problem,) = src.check()
    assert f"127.0.0.1:{params['port']}" in problem.message
    assert "no_such_db" in problem.message and "dbname" in problem.fix
    assert "s3cret-pw" not in problem.message + problem.fix


def test_check_names_host_and_port_when_port_is_unreachable(erp: Erp) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = psycopg.conninfo.make_conninfo(erp.dsn, port=port, password="s3cret-pw", connect_timeout=2)
    src = PostgresSource(
        "erp", lambda: psycopg.connect(bad), slot="s", publication="p", origin="o", tables=[CUSTOMERS]
    )
    (problem,) = src.check()
    assert f"127.0.0.1:{port}" in problem.message
    assert "s3cret-pw" not in problem.message + problem.fix
    assert "port" in problem.fix


def test_read_keeps_uuid_as_text_when_captured(erp: Erp) -> None:
    """uuid has no converter: it travels as its canonical text (JSON-safe)."""
    src = erp.source()
    value = uuid.uuid4()
    erp.sql(f"INSERT INTO kinds (id, u) VALUES (2, '{value}')")
    (change,) = drain(src)[0]
    assert change.fields["u"] == str(value)


def test_check_asks_for_replication_and_origin_grants_when_role_is_plain(erp: Erp) -> None:
    role = f"r_{erp.dbname}"
    erp.init([CUSTOMERS])
    erp.sql(f'CREATE ROLE "{role}" LOGIN', f'GRANT SELECT ON customers TO "{role}"')
    try:
        as_role = psycopg.conninfo.make_conninfo(erp.dsn, user=role)
        src = PostgresSource(
            "erp",
            lambda: psycopg.connect(as_role),
            slot=erp.slot,
            publication=erp.publication,
            origin=erp.origin,
            tables=[CUSTOMERS],
        )
        errors = _errors(src)
        assert len(errors) == 2
        assert any("REPLICATION" in e and f'ALTER ROLE "{role}" REPLICATION' in e for e in errors)
        assert any("GRANT EXECUTE ON FUNCTION pg_replication_origin_session_setup(text)" in e for e in errors)
    finally:
        erp.sql(f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def test_read_moves_slot_to_checkpoint_first_when_crash_came_before_advance(erp: Erp) -> None:
    src = erp.source()
    erp.sql("INSERT INTO customers (id) VALUES (1)", "INSERT INTO customers (id) VALUES (2)")
    start = erp.confirmed_flush()
    batch = src.read("wal", None, limit=10_000)
    assert len(batch.changes) == 2 and not batch.more
    src.close()  # journaled, then killed before commit(): the slot did not move
    assert erp.confirmed_flush() == start
    restarted = erp.source(init=False)
    erp.sql("INSERT INTO customers (id) VALUES (3)")
    changes, _ = drain(restarted, batch.next_cursor)
    assert [c.key["id"] for c in changes] == [3]
    assert erp.confirmed_flush() > str_to_lsn(batch.next_cursor.data["lsn"])


def test_read_and_resync_honour_row_filter_when_table_has_one(erp: Erp) -> None:
    filtered = TableSpec("public", "customers", row_filter="id > 10")
    src = erp.source([filtered])
    erp.sql("INSERT INTO customers (id) VALUES (5), (15)", "UPDATE customers SET name = 'n'")
    changes, _ = drain(src)
    assert [(c.op, c.key["id"]) for c in changes] == [("insert", 15), ("update", 15)]
    resynced = [c.key["id"] for b in _resync_all(src, "public.customers") for c in b.changes]
    assert resynced == [15]


def test_commit_ignores_resync_cursor_when_given_one(erp: Erp) -> None:
    erp.sql("INSERT INTO customers (id) VALUES (1)")
    src = erp.source()
    start = erp.confirmed_flush()
    (batch,) = _resync_all(src, "public.customers")
    src.commit("wal", batch.next_cursor)
    assert erp.confirmed_flush() == start

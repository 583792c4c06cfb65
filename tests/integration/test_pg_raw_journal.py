"""Row changes journaled raw (pgoutput bytes + shape) read back exactly as decoded changes would."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import pipeline
from agent.errors import PermanentError
from agent.model import Change, Cursor, RawChange
from connectors.postgres import PostgresSource, rowformat
from state import journal, open_state
from state.db import State
from tests.integration.test_pg_source import BIG_TEXT, Erp

pytestmark = pytest.mark.pg


def _read_all(src: PostgresSource) -> list[Change | RawChange]:
    out: list[Change | RawChange] = []
    cursor: Cursor | None = None
    while True:
        batch = src.read("wal", cursor, limit=10_000)
        out.extend(batch.changes)
        cursor = batch.next_cursor
        src.commit("wal", cursor)
        if not batch.more:
            return out


def _decoded(c: Change | RawChange) -> Change:
    """The change as the capture process decodes it (what a format-1 journal row would hold)."""
    return Change(
        source=c.source, stream=c.stream, object_name=c.object_name, op=c.op, key=c.key, fields=c.fields,
        position=c.position, version=c.version, source_ts=c.source_ts, origin=c.origin,
        unchanged=c.unchanged, old_key=c.old_key, trace_id=c.trace_id,
    )  # fmt: skip


def _journal(tmp_path: Path, name: str, changes: list[Change | RawChange]) -> State:
    st = open_state(tmp_path / f"{name}.db")
    with st.write_txn():
        assert journal.append(st, changes) == len(changes)
    return st


def _capture_everything(erp: Erp) -> list[Change | RawChange]:
    erp.sql("ALTER TABLE customers REPLICA IDENTITY FULL")
    erp.sql(f"INSERT INTO customers (id, name, notes) VALUES (9, 'toast', {BIG_TEXT})")
    src = erp.source()
    erp.sql(
        "INSERT INTO customers (id, name, status, amount) VALUES (1, 'Acme', 'new', 10.50), (2, 'Bolt', NULL, 0.0000001)",
        "UPDATE customers SET status = 'active' WHERE id = 1",
        "UPDATE customers SET name = 'toast 2' WHERE id = 9",  # notes stays unchanged TOAST
        "DELETE FROM customers WHERE id = 2",
        "INSERT INTO lines VALUES (1, 1, 'a')",
        "UPDATE lines SET n = 2 WHERE order_id = 1",  # a key change: old_key
        "DELETE FROM lines WHERE order_id = 1",  # key-only old tuple
        "INSERT INTO kinds VALUES (1, -32768, 2147483647, 9223372036854775807, 12345678901234567890.000000001, "
        "'tëxt', true, '2024-02-29', '2024-02-29 13:14:15.123456', '2024-02-29 13:14:15+02', "
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2.5]}', '{\"b\": null}', '{1,NULL,3}', "
        "'{\"x y\",z}', '\\x00ff10', 'sad', NULL)",
        "ALTER TABLE customers ADD COLUMN region text",
        "INSERT INTO customers (id, region) VALUES (3, 'EU')",
        "TRUNCATE lines",
    )
    return _read_all(src)


def test_raw_rows_read_back_as_the_same_changes_decoded_rows_read_back_as(erp: Erp, tmp_path: Path) -> None:
    captured = _capture_everything(erp)
    assert sum(isinstance(c, RawChange) for c in captured) == 10
    assert [c.op for c in captured if not isinstance(c, RawChange)] == ["truncate"]
    raw = _journal(tmp_path, "raw", captured)
    decoded = _journal(tmp_path, "decoded", [c if isinstance(c, Change) else _decoded(c) for c in captured])
    try:
        from_raw = journal.read_pending(raw, 0, 100, formats=pipeline.ROW_FORMATS)
        from_decoded = journal.read_pending(decoded, 0, 100)
        assert [e.change for e in from_raw] == [e.change for e in from_decoded]
        by_key = {(e.change.object_name, e.change.op, str(dict(e.change.key))): e.change for e in from_raw}
        toast = by_key[("public.customers", "update", "{'id': 9}")]
        assert toast.unchanged == frozenset({"notes"}) and "notes" not in toast.fields
        assert by_key[("public.lines", "update", "{'order_id': 1, 'n': 2}")].old_key == {
            "order_id": 1,
            "n": 1,
        }
        tiny = by_key[("public.customers", "insert", "{'id': 2}")]
        assert tiny.fields["amount"] == "0.00"  # numeric(12,2) keeps its scale, as text
        assert by_key[("public.customers", "insert", "{'id': 3}")].fields["region"] == "EU"
        kinds = by_key[("public.kinds", "insert", "{'id': 1}")].fields
        assert kinds["tstz"] == "2024-02-29T11:14:15+00:00" and kinds["by"] == "\\x00ff10"
        assert kinds["arr"] == [1, None, 3] and kinds["n"] == "12345678901234567890.000000001"
    finally:
        raw.close()
        decoded.close()


def test_raw_rows_decode_from_their_stored_shape_in_a_process_that_never_saw_them(
    erp: Erp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _capture_everything(erp)
    st = _journal(tmp_path, "raw", captured)
    try:
        first = journal.read_pending(st, 0, 100, formats=pipeline.ROW_FORMATS)
        monkeypatch.setattr(rowformat, "_plans", {})  # as a new process: no plan built yet
        again = journal.read_pending(st, 0, 100, formats=pipeline.ROW_FORMATS)
        assert [e.change for e in again] == [e.change for e in first]
        # One shape per table version: customers before and after ADD COLUMN, lines, kinds.
        shapes = st.conn.execute("SELECT format, count(*) FROM journal_shapes GROUP BY format").fetchall()
        assert [tuple(r) for r in shapes] == [("pgoutput1", 4)]
    finally:
        st.close()


def test_raw_rows_are_kept_once_per_position_when_the_same_batch_is_journaled_again(
    erp: Erp, tmp_path: Path
) -> None:
    captured = _capture_everything(erp)
    st = _journal(tmp_path, "raw", captured)
    try:
        with st.write_txn():
            assert journal.append(st, captured) == 0
        assert len(journal.read_pending(st, 0, 100, formats=pipeline.ROW_FORMATS)) == len(captured)
        assert st.conn.execute("SELECT count(*) FROM journal_shapes").fetchone()[0] == 4
    finally:
        st.close()


def test_reading_a_raw_row_without_its_decoder_names_the_row_and_the_format(erp: Erp, tmp_path: Path) -> None:
    captured = _capture_everything(erp)
    st = _journal(tmp_path, "raw", captured)
    try:
        with pytest.raises(PermanentError, match=r"journal row 1 holds a raw pgoutput1 row"):
            journal.read_pending(st, 0, 100)
    finally:
        st.close()

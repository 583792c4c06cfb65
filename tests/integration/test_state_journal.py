"""state.journal on a real SQLite file: append/dedup, read, fates, stats, prune, throughput."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from agent.model import Change, Cursor
from state import checkpoints, journal
from state.db import State, open_state

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def change(i: int, *, source: str = "erp", **kw: object) -> Change:
    args: dict[str, object] = {
        "source": source,
        "stream": "wal",
        "object_name": "public.orders",
        "op": "update",
        "key": {"id": i},
        "fields": {"id": i, "amount": Decimal("10.50"), "status": "open"},
        "position": f"0/{i:08X}:0",
        "version": f"0/{i:08X}",
        "source_ts": T0,
    }
    args.update(kw)
    return Change(**args)  # type: ignore[arg-type]


def test_journal_append_returns_new_rows_and_skips_duplicates_when_positions_repeat(st: State) -> None:
    assert journal.append(st, [change(1), change(2), change(2)]) == 2
    assert journal.append(st, [change(1), change(2), change(3)]) == 1
    entries = journal.read_pending(st, 0, 100)
    assert [e.change.position for e in entries] == [change(i).position for i in (1, 2, 3)]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)


def test_journal_append_keeps_same_position_when_sources_differ(st: State) -> None:
    assert journal.append(st, [change(1, source="erp"), change(1, source="crm")]) == 2


def test_journal_append_returns_zero_when_batch_empty(st: State) -> None:
    assert journal.append(st, []) == 0
    assert journal.last_seq(st) == 0


def test_journal_append_raises_instead_of_skipping_when_row_breaks_a_check(st: State) -> None:
    with pytest.raises(sqlite3.IntegrityError):
        journal.append(st, [change(1), change(2, op="bogus")])
    assert journal.read_pending(st, 0, 10) == []


def test_journal_read_pending_round_trips_change_as_json_types_when_read_back(st: State) -> None:
    c = change(
        7,
        op="delete",
        unchanged=frozenset({"notes", "blob"}),
        old_key={"id": 6},
        origin="syncagent",
        source_ts=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
    )
    journal.append(st, [c], captured_at=T0)
    [e] = journal.read_pending(st, 0, 10)
    assert e.status == "pending"
    assert e.captured_at == T0
    back = e.change
    assert back.fields == {"id": 7, "amount": "10.50", "status": "open"}  # Decimal comes back as str
    assert back.key == {"id": 7}
    assert back.unchanged == frozenset({"notes", "blob"})
    assert back.old_key == {"id": 6}
    assert back.source_ts == c.source_ts
    assert (back.op, back.origin, back.trace_id, back.version) == (
        "delete",
        "syncagent",
        c.trace_id,
        c.version,
    )


def test_journal_read_pending_returns_rows_after_seq_in_order_when_limited(st: State) -> None:
    journal.append(st, [change(i) for i in range(10)])
    first = journal.read_pending(st, 0, 4)
    rest = journal.read_pending(st, first[-1].seq, 100)
    assert len(first) == 4 and len(rest) == 6
    assert [e.change.key["id"] for e in first + rest] == list(range(10))


def test_journal_read_pending_includes_resolved_rows_when_rewound(st: State) -> None:
    journal.append(st, [change(1), change(2)])
    seqs = [e.seq for e in journal.read_pending(st, 0, 10)]
    journal.set_fate(st, [(seqs[0], "applied", None)])
    assert [e.status for e in journal.read_pending(st, 0, 10)] == ["resolved", "pending"]


@pytest.mark.parametrize(
    ("first", "second", "final"),
    [
        ("queued", "applied", "applied"),
        ("queued", "exception", "exception"),
        ("exception", "applied", "applied"),
        ("applied", "queued", "applied"),
        ("echo", "applied", "echo"),
        ("noop", "exception", "noop"),
        ("ignored", "queued", "ignored"),
    ],
)
def test_journal_set_fate_moves_only_forward_when_set_twice(
    st: State, first: str, second: str, final: str
) -> None:
    journal.append(st, [change(1)])
    seq = journal.last_seq(st)
    assert journal.set_fate(st, [(seq, first, "one")]) == 1
    journal.set_fate(st, [(seq, second, "two")])
    row = journal.get(st, seq)
    assert row is not None
    assert (row.entry.status, row.fate) == ("resolved", final)


def test_journal_set_fate_raises_when_fate_unknown(st: State) -> None:
    journal.append(st, [change(1)])
    with pytest.raises(ValueError, match="unknown journal fate"):
        journal.set_fate(st, [(1, "lost", None)])


def test_journal_list_entries_filters_source_and_shows_fate_when_listing(st: State) -> None:
    journal.append(st, [change(1, source="erp"), change(1, source="crm"), change(2, source="erp")])
    erp = journal.list_entries(st, source="erp")
    assert [r.entry.change.source for r in erp] == ["erp", "erp"]
    journal.set_fate(st, [(erp[0].entry.seq, "queued", "salesforce")])
    rows = journal.list_entries(st, since_seq=0, limit=2)
    assert [(r.fate, r.fate_detail) for r in rows] == [("queued", "salesforce"), (None, None)]
    assert journal.list_entries(st, since_seq=rows[-1].entry.seq) == journal.list_entries(st)[2:]


def test_journal_get_returns_none_when_seq_absent(st: State) -> None:
    assert journal.get(st, 42) is None


def test_journal_stats_counts_rows_and_backlog_per_source_when_resolver_has_moved(st: State) -> None:
    journal.append(st, [change(i, source="erp") for i in range(3)], captured_at=T0)
    journal.append(st, [change(i, source="crm") for i in range(2)], captured_at=T0 + timedelta(minutes=1))
    rows = journal.read_pending(st, 0, 10)
    journal.set_fate(st, [(rows[0].seq, "applied", None)])
    checkpoints.advance(
        st, journal.RESOLVER_OWNER, journal.RESOLVER_STREAM, Cursor({"v": 1, "seq": rows[0].seq})
    )
    stats = journal.stats(st)
    assert stats["erp"] == journal.JournalStats(count=3, pending=2, oldest_pending_at=T0)
    assert stats["crm"] == journal.JournalStats(
        count=2, pending=2, oldest_pending_at=T0 + timedelta(minutes=1)
    )


def test_journal_first_seq_at_or_after_finds_boundary_when_batches_captured_at_times(st: State) -> None:
    journal.append(st, [change(1), change(2)], captured_at=T0)
    journal.append(st, [change(3)], captured_at=T0 + timedelta(hours=1))
    third = journal.read_pending(st, 0, 10)[2].seq
    assert journal.first_seq_at_or_after(st, T0 + timedelta(minutes=30)) == third
    assert journal.first_seq_at_or_after(st, T0 + timedelta(hours=2)) is None


def _fates(st: State) -> dict[int, str | None]:
    return {r.entry.change.key["id"]: r.fate for r in journal.list_entries(st, limit=1000)}


def test_journal_prune_keeps_pending_queued_exception_and_unresolved_rows_when_old(st: State) -> None:
    journal.append(st, [change(i) for i in range(8)], captured_at=T0)
    journal.append(st, [change(100)], captured_at=T0 + timedelta(days=10))
    seq = {r.entry.change.key["id"]: r.entry.seq for r in journal.list_entries(st, limit=1000)}
    journal.set_fate(
        st,
        [
            (seq[0], "applied", None),
            (seq[1], "queued", None),
            (seq[2], "exception", None),
            (seq[3], "echo", None),
            # seq[4] stays pending
            (seq[5], "noop", None),
            (seq[6], "applied", None),
            (seq[7], "applied", None),
            (seq[100], "applied", None),
        ],
    )
    # The resolver stands at seq[6]: rows at or after it stay, even if settled and old.
    checkpoints.advance(st, journal.RESOLVER_OWNER, journal.RESOLVER_STREAM, Cursor({"v": 1, "seq": seq[6]}))
    deleted = journal.prune(st, older_than=T0 + timedelta(days=1))
    assert deleted == 3
    assert _fates(st) == {1: "queued", 2: "exception", 4: None, 6: "applied", 7: "applied", 100: "applied"}


def test_journal_prune_removes_nothing_newer_than_cutoff_when_no_resolver_checkpoint(st: State) -> None:
    journal.append(st, [change(1)], captured_at=T0)
    journal.append(st, [change(2)], captured_at=T0 + timedelta(days=5))
    journal.set_fate(st, [(r.entry.seq, "applied", None) for r in journal.list_entries(st)])
    assert journal.prune(st, older_than=T0 + timedelta(days=1)) == 1
    assert list(_fates(st)) == [2]


def test_journal_last_seq_never_goes_back_when_everything_pruned(st: State) -> None:
    journal.append(st, [change(1), change(2)], captured_at=T0)
    top = journal.last_seq(st)
    journal.set_fate(st, [(r.entry.seq, "applied", None) for r in journal.list_entries(st)])
    assert journal.prune(st, older_than=T0 + timedelta(days=1)) == 2
    assert journal.last_seq(st) == top
    journal.append(st, [change(3)])
    assert journal.last_seq(st) > top


@pytest.mark.slow
def test_journal_append_throughput_when_200k_changes_in_batches_of_10k(st: State) -> None:
    n, batch = 200_000, 10_000
    changes = [
        Change(
            source="erp",
            stream="wal",
            object_name="public.orders",
            op="update",
            key={"id": i},
            fields={
                "id": i,
                "customer_id": i % 977,
                "status": "open",
                "amount": Decimal("1234.50"),
                "currency": "EUR",
                "updated_at": T0,
                "note": "hello world",
            },
            position=f"0/{i:016X}:0",
            version=f"0/{i:016X}",
            source_ts=T0,
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        assert journal.append(st, changes[start : start + batch]) == batch
    elapsed = time.perf_counter() - t0
    rate = n / elapsed
    print(
        f"\njournal.append: {n} changes in {elapsed:.2f}s = {rate:,.0f} rows/s"
        " (synchronous=FULL, codec included)"
    )
    assert st.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert journal.last_seq(st) == n
    # A loose floor: the 2-core shared test machine does ~140k/s; this catches regressions
    # of the kind an IN-list CHECK (40%) or an extra index (15% each) would cause.
    assert rate > 50_000


def test_journal_migration_m003_keeps_rows_fates_and_seq_counter_when_upgrading_a_wide_journal(
    tmp_path: Path,
) -> None:
    from sqlite_utils import Database
    from sqlite_utils.migrations import Migrations

    from state.migrations import m001_initial_tables, m002_workflows

    path = tmp_path / "old.db"
    raw = sqlite3.connect(path, isolation_level=None)
    old = Migrations("syncagent")
    old(name="m001_initial_tables")(m001_initial_tables)
    old(name="m002_workflows")(m002_workflows)
    old.apply(Database(raw))
    wide = (
        "INSERT INTO journal (source, stream, object_name, op, key, fields, unchanged, old_key,"
        " position, version, source_ts, origin, trace_id, captured_at, status, fate, fate_detail)"
        " VALUES (?, 'wal', 'public.orders', ?, ?, ?, ?, ?, ?, '0/10', ?, ?, ?, ?, ?, ?, ?)"
    )
    at = "2024-05-01T12:00:00.000000+00:00"
    raw.executemany(
        wide,
        [
            ("erp", "update", '{"id":1}', '{"id":1,"amount":"10.50","n":"é"}', '["blob","notes"]',
             '{"id":0}', "0/10:0", "2024-05-01T14:00:00.000000+00:00", "syncagent", "t1", at,
             "resolved", "applied", "done"),
            ("erp", "delete", '{"id":2}', '{"id":2}', "[]", None, "0/10:1", None, None, "t2", at,
             "pending", None, None),
            ("crm", "insert", '{"id":3}', '{"big":123456789012345678901234567890}', "[]", None,
             "0/10:1", at, None, "t3", at, "pending", None, None),
        ],
    )  # fmt: skip
    raw.execute("DELETE FROM journal WHERE seq = 3")  # pruned: seq 3 must never come back
    raw.close()

    st = open_state(path)
    try:
        rows = journal.list_entries(st)
        assert [(r.entry.seq, r.fate, r.fate_detail, r.entry.status) for r in rows] == [
            (1, "applied", "done", "resolved"),
            (2, None, None, "pending"),
        ]
        first, second = rows[0].entry.change, rows[1].entry.change
        assert first == Change(
            source="erp", stream="wal", object_name="public.orders", op="update", key={"id": 1},
            fields={"id": 1, "amount": "10.50", "n": "é"}, position="0/10:0", version="0/10",
            source_ts=datetime(2024, 5, 1, 14, 0, tzinfo=UTC), origin="syncagent",
            unchanged=frozenset({"blob", "notes"}), old_key={"id": 0}, trace_id="t1",
        )  # fmt: skip
        assert (second.op, second.unchanged, second.old_key, second.source_ts) == (
            "delete",
            frozenset(),
            None,
            None,
        )
        assert rows[0].entry.captured_at == T0
        assert journal.append(st, [change(9)]) == 1
        assert journal.last_seq(st) == 4, "a pruned seq was handed out again"
        assert journal.append(st, [change(9)]) == 0, "(source, position) is still unique"
    finally:
        st.close()

"""The three transactional invariants, and a writer killed mid-transaction, on real SQLite files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.model import Change, Cursor, Op
from state import checkpoints, journal, outbox, shadow, xref
from state.db import State, open_state

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


class Crash(Exception):
    """Stands for anything going wrong half-way through a transaction."""


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def changes(n: int) -> list[Change]:
    return [
        Change(
            "erp", "wal", "public.orders", "insert", {"id": i}, {"id": i}, position=f"0/{i:X}:0", version="v"
        )
        for i in range(n)
    ]


def an_op(seq: int) -> Op:
    return Op(
        idempotency_key=f"sf:{seq}",
        target="salesforce",
        entity="contract",
        canonical_id="c1",
        object_name="Opportunity",
        action="upsert",
        key={"ERP_Id__c": "P-1"},
        fields={"Name": "P-1"},
        trace_id="t",
        source_seq=seq,
        canonical={"name": "P-1"},
    )


def test_capture_txn_leaves_no_rows_and_old_cursor_when_it_fails_after_append(st: State) -> None:
    checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/0"}))
    with pytest.raises(Crash), st.write_txn():
        assert journal.append(st, changes(100)) == 100
        checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/64"}))
        raise Crash
    assert journal.read_pending(st, 0, 1000) == []
    cp = checkpoints.get(st, "source:erp", "wal")
    assert cp is not None and cp.cursor.data["lsn"] == "0/0"


def test_capture_txn_commits_rows_and_cursor_together_when_it_succeeds(st: State) -> None:
    with st.write_txn():
        journal.append(st, changes(100))
        checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/64"}))
    assert len(journal.read_pending(st, 0, 1000)) == 100
    assert checkpoints.get(st, "source:erp", "wal") is not None


def test_resolve_txn_leaves_no_ops_fates_or_position_when_it_fails_after_enqueue(st: State) -> None:
    journal.append(st, changes(3))
    seqs = [e.seq for e in journal.read_pending(st, 0, 10)]
    with pytest.raises(Crash), st.write_txn():
        outbox.enqueue(st, [an_op(s) for s in seqs], now=NOW)
        journal.set_fate(st, [(s, "queued", "salesforce") for s in seqs])
        checkpoints.advance(st, "resolver", "journal", Cursor({"v": 1, "seq": seqs[-1]}))
        raise Crash
    assert outbox.claim_due(st, "salesforce", now=NOW, limit=10) == []
    assert [e.status for e in journal.read_pending(st, 0, 10)] == ["pending"] * 3
    assert checkpoints.get(st, "resolver", "journal") is None


def test_deliver_txn_leaves_op_pending_without_xref_or_shadow_when_it_fails_after_outcome(st: State) -> None:
    outbox.enqueue(st, [an_op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None
    with pytest.raises(Crash), st.write_txn():
        outbox.mark_applied(st, o.op_id, "006A", "v1")
        xref.link(st, "contract", "c1", "salesforce", "006A")
        shadow.put(st, "contract", "c1", o.canonical, system="salesforce", by_agent=True, source_ts=None)
        raise Crash
    row = outbox.get(st, o.op_id)
    assert row is not None and row.status == "pending" and row.external_id is None
    assert xref.members(st, "contract", "c1") == {}
    assert shadow.get(st, "contract", "c1") == {}


def test_deliver_txn_keeps_earlier_outcomes_when_one_nested_outcome_fails(st: State) -> None:
    outbox.enqueue(st, [an_op(1), an_op(2)], now=NOW)
    a, b = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert a.op_id is not None and b.op_id is not None
    with st.write_txn():
        outbox.mark_applied(st, a.op_id, "006A")
        with pytest.raises(Crash), st.write_txn():
            outbox.mark_applied(st, b.op_id, "006B")
            raise Crash
    got_a, got_b = outbox.get(st, a.op_id), outbox.get(st, b.op_id)
    assert got_a is not None and got_a.status == "applied"
    assert got_b is not None and got_b.status == "pending"


_CHILD = textwrap.dedent(
    """
    import sys
    from agent.model import Change, Cursor
    from state import checkpoints, journal
    from state.db import open_state

    def batch(start, n):
        return [Change("erp", "wal", "public.orders", "insert", {"id": i}, {"id": i, "note": "x" * 50},
                       position=f"0/{i:X}:0", version="v") for i in range(start, start + n)]

    st = open_state(sys.argv[1])
    # A tiny page cache makes SQLite spill the open transaction's pages into the WAL,
    # so the kill leaves uncommitted frames on disk for recovery to discard.
    st.conn.execute("PRAGMA cache_size = 20")
    with st.write_txn():
        journal.append(st, batch(0, 100))
        checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/100"}))
    with st.write_txn():
        journal.append(st, batch(100, 10_000))
        checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/10100"}))
        print("in-transaction", flush=True)
        sys.stdin.read()
    """
)


def test_state_file_has_no_uncommitted_rows_and_opens_cleanly_when_writer_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "in-transaction"
        assert path.with_name("state.db-wal").stat().st_size > 500_000
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with open_state(path) as st:
        assert st.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert journal.last_seq(st) == 100
        assert len(journal.read_pending(st, 0, 20_000)) == 100
        cp = checkpoints.get(st, "source:erp", "wal")
        assert cp is not None and cp.cursor.data["lsn"] == "0/100"
        # The killed batch, re-read after restart, is accepted in full; a second re-read is a no-op.
        replay = [
            Change(
                "erp",
                "wal",
                "public.orders",
                "insert",
                {"id": i},
                {"id": i},
                position=f"0/{i:X}:0",
                version="v",
            )
            for i in range(100, 10_100)
        ]
        assert journal.append(st, replay) == 10_000
        assert journal.append(st, replay) == 0

"""state.db on real SQLite files: open, pragmas, permissions, migrations, transactions, locking."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import PermanentError, RetryableError
from state import audit, migrations
from state.db import State, classify_sqlite, open_state
from state.migrations import schema_version

TABLES = {
    "checkpoints",
    "checkpoint_history",
    "journal",
    "xref",
    "xref_natural",
    "shadow",
    "outbox",
    "exceptions",
    "audit",
    "connector_health",
}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "statedir" / "syncagent.db"


@pytest.fixture
def st(db_path: Path) -> Iterator[State]:
    s = open_state(db_path)
    yield s
    s.close()


def _count(st: State) -> int:
    return st.conn.execute("SELECT count(*) FROM audit").fetchone()[0]


def test_open_state_creates_private_folder_and_files_when_umask_is_permissive(db_path: Path) -> None:
    old = os.umask(0)
    try:
        st = open_state(db_path)
        audit.record(st, "probe")
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        for suffix in ("", "-wal", "-shm"):
            f = db_path.with_name(db_path.name + suffix)
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        st.close()


def test_open_state_sets_durability_pragmas_when_opened(st: State) -> None:
    q = lambda p: st.conn.execute(f"PRAGMA {p}").fetchone()[0]  # noqa: E731
    assert q("journal_mode") == "wal"
    assert q("synchronous") == 2  # FULL
    assert q("foreign_keys") == 1
    assert q("busy_timeout") == 10000
    assert st.conn.isolation_level is None


def test_open_state_uses_large_pages_when_new_and_keeps_an_existing_files_pages(tmp_path: Path) -> None:
    new = open_state(tmp_path / "new.db")
    try:
        assert new.conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    finally:
        new.close()
    old_path = tmp_path / "old.db"
    raw = sqlite3.connect(old_path)
    raw.execute("PRAGMA page_size = 4096")
    raw.execute("VACUUM")
    raw.close()
    old = open_state(old_path)
    try:
        assert old.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert schema_version(old) == len(migrations._STEPS)
    finally:
        old.close()


def test_open_state_creates_every_table_at_the_latest_schema_version_when_new(st: State) -> None:
    assert TABLES <= set(st.db.table_names())
    assert schema_version(st) == len(migrations._STEPS)


def test_open_state_applies_nothing_when_reopened(db_path: Path) -> None:
    open_state(db_path).close()
    with open_state(db_path) as st:
        assert schema_version(st) == len(migrations._STEPS)
        assert [m.name for m in migrations.migration_set().pending(st.db)] == []


def test_open_state_raises_permanent_error_naming_path_when_file_is_not_sqlite(db_path: Path) -> None:
    db_path.parent.mkdir()
    db_path.write_bytes(b"this is a text file, not a database" * 100)
    with pytest.raises(PermanentError, match=str(db_path)):
        open_state(db_path)


def test_open_state_refuses_when_sqlite_file_belongs_to_another_application(db_path: Path) -> None:
    db_path.parent.mkdir()
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE invoices (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(PermanentError, match="not a syncagent state file"):
        open_state(db_path)


def test_open_state_raises_permanent_error_when_schema_is_newer(db_path: Path) -> None:
    open_state(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at)"
        " VALUES ('syncagent', 'm999_future', 'x')"
    )
    raw.commit()
    raw.close()
    for readonly in (False, True):
        with pytest.raises(PermanentError, match="newer version"):
            open_state(db_path, readonly=readonly)


def test_open_state_readonly_raises_permanent_error_when_file_missing(db_path: Path) -> None:
    with pytest.raises(PermanentError, match="no state file"):
        open_state(db_path, readonly=True)
    assert not db_path.exists()


def test_write_txn_raises_permanent_error_when_state_readonly(st: State, db_path: Path) -> None:
    with open_state(db_path, readonly=True) as ro:
        with pytest.raises(PermanentError, match="read-only"), ro.write_txn():
            pass
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.conn.execute("DELETE FROM audit")


def test_write_txn_commits_when_block_exits_normally(st: State, db_path: Path) -> None:
    with st.write_txn():
        audit.record(st, "a")
        audit.record(st, "b")
    with open_state(db_path, readonly=True) as other:
        assert _count(other) == 2


def test_write_txn_rolls_back_everything_when_block_raises(st: State) -> None:
    with pytest.raises(RuntimeError), st.write_txn():
        audit.record(st, "a")
        raise RuntimeError("boom")
    assert _count(st) == 0
    assert not st.in_transaction


def test_write_txn_rolls_back_only_inner_savepoint_when_nested_block_raises(st: State) -> None:
    with st.write_txn():
        audit.record(st, "outer")
        with pytest.raises(RuntimeError), st.write_txn():
            audit.record(st, "inner")
            with st.write_txn():
                audit.record(st, "innermost")
            raise RuntimeError("inner fails")
        audit.record(st, "outer again")
    assert [r.action for r in audit.list_records(st)] == ["outer again", "outer"]


def test_write_txn_becomes_savepoint_when_inside_sqlite_utils_atomic(st: State) -> None:
    with pytest.raises(RuntimeError), st.db.atomic():
        with st.write_txn():
            audit.record(st, "x")
        raise RuntimeError("outer atomic fails")
    assert _count(st) == 0


def test_write_txn_waits_for_lock_then_succeeds_when_another_connection_writes(
    st: State, db_path: Path
) -> None:
    other = open_state(db_path)
    started = threading.Event()
    done: list[float] = []

    def second_writer() -> None:
        started.set()
        t0 = time.monotonic()
        with other.write_txn():
            audit.record(other, "second")
        done.append(time.monotonic() - t0)

    with st.write_txn():
        audit.record(st, "first")
        t = threading.Thread(target=second_writer)
        t.start()
        started.wait()
        time.sleep(0.3)
        assert not done, "second writer must wait for the write lock"
    t.join(5)
    other.close()
    assert done and done[0] >= 0.2
    assert [r.action for r in audit.list_records(st)] == ["second", "first"]


def test_reader_reads_committed_rows_when_another_connection_holds_write_lock(
    st: State, db_path: Path
) -> None:
    audit.record(st, "committed")
    with open_state(db_path, readonly=True) as reader, st.write_txn():
        audit.record(st, "uncommitted")
        t0 = time.monotonic()
        assert [r.action for r in audit.list_records(reader)] == ["committed"]
        assert time.monotonic() - t0 < 1.0


def test_write_txn_raises_retryable_error_when_lock_held_past_busy_timeout(st: State, db_path: Path) -> None:
    impatient = open_state(db_path, busy_timeout_ms=50)
    try:
        with st.write_txn():
            audit.record(st, "holding")
            with pytest.raises(RetryableError, match="busy") as info, impatient.write_txn():
                pass
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    finally:
        impatient.close()


def test_classify_sqlite_passes_other_errors_through_when_not_lock_contention(st: State) -> None:
    with pytest.raises(sqlite3.IntegrityError), classify_sqlite(st.path):
        st.conn.execute("INSERT INTO audit (at) VALUES (NULL)")

"""Background WAL checkpoints of the state file: copied off the committing thread, one per file."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from state.db import open_state


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "state-checkpoint" and t.is_alive()]


def _write_mb(st, mb: int) -> None:
    st.conn.execute("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
    for _ in range(mb):
        with st.write_txn():
            st.conn.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(1024),) for _ in range(1024)])


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_committed_pages_reach_the_database_file_from_the_background_thread(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    st = open_state(path, background_checkpoints=True)
    try:
        # The writer itself no longer checkpoints at SQLite's default threshold...
        assert st.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 10_000
        before = path.stat().st_size
        _write_mb(st, 4)  # ~260 pages of 16 KiB: far below either threshold
        # ...yet the pages are copied into the database file soon after the commits.
        assert _wait_for(lambda: path.stat().st_size >= before + 4 * 2**20)
    finally:
        st.close()


def test_without_background_checkpoints_small_commits_stay_in_the_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    st = open_state(path)
    try:
        assert not _checkpoint_threads()
        before = path.stat().st_size
        _write_mb(st, 4)
        time.sleep(0.5)
        assert path.stat().st_size < before + 2**20
        assert Path(f"{path}-wal").stat().st_size >= 4 * 2**20
    finally:
        st.close()


def test_connections_to_one_file_share_one_checkpointer_that_ends_with_the_last(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = open_state(path, background_checkpoints=True)
    second = open_state(path, background_checkpoints=True)
    other = open_state(tmp_path / "other.db", background_checkpoints=True)
    assert len(_checkpoint_threads()) == 2
    first.close()
    assert len(_checkpoint_threads()) == 2  # the second connection still uses its file's thread
    second.close()
    other.close()
    assert _wait_for(lambda: not _checkpoint_threads(), 5)
    # Every committed page is in the database once the last connection closed.
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


def test_read_only_connection_starts_no_checkpointer(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    open_state(path).close()
    ro = open_state(path, readonly=True, background_checkpoints=True)
    try:
        assert not _checkpoint_threads()
    finally:
        ro.close()

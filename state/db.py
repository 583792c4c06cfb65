"""The state file's connection: pragmas, write transactions, migrations at open, SQLite errors.

Every write goes through ``State.write_txn()``, which starts with ``BEGIN IMMEDIATE``: the
write lock is taken up front, so a transaction never fails half-way when it tries to upgrade
from a read lock (what a deferred ``BEGIN``, as in sqlite-utils' ``atomic()``, can do under
concurrent writers). Inside it, nested ``write_txn()`` blocks (and sqlite-utils ``atomic()``
blocks) become savepoints. The connection runs in autocommit mode (``isolation_level=None``)
so the sqlite3 module never opens or commits a transaction behind our back.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlite_utils

from agent.errors import PermanentError, RetryableError
from state import migrations

logger = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_MS = 10_000
# Page size of a new state file (SQLite's default is 4096).
PAGE_SIZE = 16_384

# Primary result codes (the low byte of an extended code), from sqlite3.h.
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _is_busy(exc: sqlite3.Error) -> bool:
    """Tell whether ``exc`` means another connection holds a lock we need."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _is_disk_problem(exc: sqlite3.Error) -> bool:
    """Tell whether ``exc`` means the disk is full or failed an I/O (an operating condition)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (10, 13)  # SQLITE_IOERR, SQLITE_FULL
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


def _is_not_a_database(exc: sqlite3.Error) -> bool:
    """Tell whether ``exc`` means the file is not (or no longer) a readable SQLite database."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_NOTADB, _SQLITE_CORRUPT)
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


@contextmanager
def classify_sqlite(path: str | Path | None = None) -> Iterator[None]:
    """Re-raise SQLite lock contention as ``RetryableError`` and a broken file as ``PermanentError``.

    Every other ``sqlite3`` error passes through unchanged: it is a bug, not an operating
    condition.
    """
    try:
        yield
    except sqlite3.Error as exc:
        where = f" ({path})" if path is not None else ""
        if _is_busy(exc):
            raise RetryableError(f"state database is busy{where}: {exc}") from exc
        if _is_disk_problem(exc):
            raise RetryableError(
                f"state file{where} cannot be written ({exc}): free space in its folder; "
                "nothing committed is lost and the agent retries"
            ) from exc
        if _is_not_a_database(exc):
            raise PermanentError(
                f"state file{where} is not a readable SQLite database ({exc}); "
                "restore it from a backup or move it aside and let syncagent create a new one"
            ) from exc
        raise


class _Checkpointer:
    """Copies one state file's WAL into the database on a thread of its own.

    SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, on the
    committing thread: for capture that is a third of the journal's cost (every page is
    written twice, to the WAL and then to the database, with an fsync of each). Here the
    writers hand that copy to this thread, which runs ``wal_checkpoint(PASSIVE)`` (it never
    blocks a writer or a reader) after commits, at most every ``_CHECKPOINT_INTERVAL_S``.
    SQLite releases the GIL while it works, so the copy overlaps the writer's Python.
    Writers keep an automatic checkpoint at a ten times higher threshold as a backstop,
    should this thread fall behind.

    One per state file per process, shared by its connections (counted in ``users``).
    """

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self.path = path
        self.users = 0
        self._busy_timeout_ms = busy_timeout_ms
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-checkpoint", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Say a transaction committed: there are new WAL frames to copy."""
        self._wake.set()

    def stop(self) -> None:
        """Finish the copy in progress, close the thread's connection and end the thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            logger.warning("event=state_checkpointer_not_started path=%s error=%s", self.path, exc)
            return
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            while not self._stopping.is_set():
                self._wake.wait()
                self._wake.clear()
                if self._stopping.is_set():
                    break
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    # The writers' backstop checkpoint still runs; say why this one did not.
                    logger.warning("event=state_checkpoint_failed path=%s error=%s", self.path, exc)
                self._stopping.wait(_CHECKPOINT_INTERVAL_S)
        finally:
            conn.close()


_CHECKPOINT_INTERVAL_S = 0.25
# SQLite's default automatic checkpoint threshold, in pages; writers with a background
# checkpointer keep ten times this as their backstop.
_AUTOCHECKPOINT_PAGES = 1000
_checkpointers: dict[Path, _Checkpointer] = {}
_checkpointers_lock = threading.Lock()


def _join_checkpointer(path: Path, busy_timeout_ms: int) -> _Checkpointer:
    key = path.resolve()
    with _checkpointers_lock:
        cp = _checkpointers.get(key)
        if cp is None:
            cp = _checkpointers[key] = _Checkpointer(key, busy_timeout_ms)
        cp.users += 1
        return cp


def _leave_checkpointer(cp: _Checkpointer) -> None:
    with _checkpointers_lock:
        cp.users -= 1
        if cp.users > 0:
            return
        del _checkpointers[cp.path]
    cp.stop()


class State:
    """An open state file: one SQLite connection, used by one thread at a time."""

    def __init__(self, path: Path, conn: sqlite3.Connection, *, readonly: bool) -> None:
        self.path = path
        self.conn = conn
        self.readonly = readonly
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self._depth = 0
        self._checkpointer: _Checkpointer | None = None

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<State {self.path} {mode}>"

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on this connection."""
        return self.conn.in_transaction

    @contextmanager
    def write_txn(self) -> Iterator[State]:
        """Run the block in one write transaction (``BEGIN IMMEDIATE``), or a savepoint if nested.

        The outermost block commits when it exits normally and rolls back on any exception;
        a nested block rolls back only its own work and re-raises, so the outer block decides.

        Raises:
            RetryableError: another connection held the write lock past the busy timeout.
            PermanentError: the state was opened read-only.
        """
        if self.readonly:
            raise PermanentError(f"state file {self.path} is open read-only; cannot write")
        if self.conn.in_transaction:
            yield from self._savepoint()
            return
        with classify_sqlite(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            # An error such as SQLITE_FULL may already have rolled the transaction back.
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            with classify_sqlite(self.path):
                self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        if self._checkpointer is not None:
            self._checkpointer.poke()

    def _savepoint(self) -> Iterator[State]:
        self._depth += 1
        name = f"syncagent_sp{self._depth}"
        with classify_sqlite(self.path):
            self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield self
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self.conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        else:
            with classify_sqlite(self.path):
                self.conn.execute(f"RELEASE SAVEPOINT {name}")
        finally:
            self._depth -= 1

    def checkpoint_in_background(self, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        """From now on, leave WAL checkpoints to the file's background checkpointer."""
        if self.readonly or self._checkpointer is not None:
            return
        with classify_sqlite(self.path):
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {10 * _AUTOCHECKPOINT_PAGES}")
        self._checkpointer = _join_checkpointer(self.path, busy_timeout_ms)

    def close(self) -> None:
        """Close the connection; an open transaction is rolled back by SQLite."""
        cp, self._checkpointer = self._checkpointer, None
        if cp is not None:
            _leave_checkpointer(cp)
        self.conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def fetch_all(st: State, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    """Run one read query for a store module and return its rows (for ``state/`` only)."""
    with classify_sqlite(st.path):
        return st.conn.execute(sql, params).fetchall()


def fetch_one(st: State, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    """Run one read query for a store module and return its first row (for ``state/`` only)."""
    with classify_sqlite(st.path):
        return st.conn.execute(sql, params).fetchone()


def _create_private(path: Path) -> None:
    """Create the folder (0700) and the empty file (0600) whatever the process umask."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    # os.open's mode is filtered through the umask; SQLite gives the -wal and -shm files
    # the main file's mode, so getting this one right covers all three.
    os.chmod(path, 0o600)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        if not path.exists():
            raise PermanentError(
                f"no state file at {path}; start the agent (or run `syncagent init`) to create it"
            )
        uri = "file:" + urllib.parse.quote(str(path.resolve())) + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        _create_private(path)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _set_pragmas(conn: sqlite3.Connection, *, readonly: bool, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not readonly:
        # Only a new, empty file takes it (before WAL mode writes its header); an existing one
        # keeps its page size. 16 KiB pages write a journal row's pages with a quarter of the
        # system calls (WAL frames and checkpoint copies) of 4 KiB ones: a third of capture's
        # kernel time on a change stream.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise PermanentError(f"could not switch the state file to WAL mode (got {mode!r})")
    # FULL: a source is acknowledged right after our commit, so the commit must be durable.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def open_state(
    path: str | Path,
    *,
    readonly: bool = False,
    busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    background_checkpoints: bool = False,
) -> State:
    """Open (creating if needed) the state file, set its pragmas and apply pending migrations.

    ``readonly=True`` opens the file without write access and without migrating, for
    ``status`` while the agent runs. ``background_checkpoints=True`` (the agent's own
    connections) moves WAL checkpoints off the committing thread (``_Checkpointer``).

    Raises:
        PermanentError: the path is not a syncagent state file, its schema is newer than
            this code, or (read-only) the file is missing or not yet migrated.
        RetryableError: another process held the write lock past the busy timeout.
    """
    path = Path(path)
    with classify_sqlite(path):
        conn = _connect(path, readonly=readonly)
    st = State(path, conn, readonly=readonly)
    try:
        with classify_sqlite(path):
            _set_pragmas(conn, readonly=readonly, busy_timeout_ms=busy_timeout_ms)
            if readonly:
                migrations.check_current(st)
            else:
                with st.write_txn():
                    migrations.apply(st)
    except BaseException:
        conn.close()
        raise
    if background_checkpoints:
        st.checkpoint_in_background(busy_timeout_ms)
    logger.debug(
        "event=state_opened path=%s readonly=%s schema_version=%s",
        path,
        readonly,
        migrations.schema_version(st),
    )
    return st

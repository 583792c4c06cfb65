"""The two measured consumers of one slot's stream: ``pg_recvlogical`` and ``syncagent run --once``.

Both run as child processes; each is timed by wall clock and its peak RSS read from
``os.wait4`` (the rusage of that one child, so runs do not mask each other). Every run
gets its own copy of a never-consumed master slot, so each decodes the identical stream
from the identical start (``pg_copy_logical_replication_slot``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from agent.localpg import LocalCluster

_TIME = "/usr/bin/time"
_CAPTURE_MS = re.compile(r"event=capture_cycle .*?\bjournaled=(\d+)\b.*?\bms=(\d+)")


@dataclass(frozen=True, slots=True)
class ProcessRun:
    """One child process: exit code, wall seconds, peak RSS (MiB) and its output."""

    returncode: int
    seconds: float
    max_rss_mib: float
    stdout: str
    stderr: str


@dataclass(frozen=True, slots=True)
class AgentRun:
    """One ``syncagent run --once``: the process, its capture cycle and the journal it left."""

    process: ProcessRun
    capture_seconds: float
    journaled: int
    journal_rows: int


def timed(argv: list[str], *, cwd: Path | None = None) -> ProcessRun:
    """Run ``argv`` to completion; return its wall time and peak RSS.

    The peak comes from ``/usr/bin/time`` when it is there: a child's own rusage would also
    count the memory of this Python process, which the child shares until its ``exec``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:  # fmt: skip
        wrapped = [_TIME, "-f", "%M", "-o", rss.name, *argv] if os.path.exists(_TIME) else argv
        started = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdout=out, stderr=err, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        # Both figures are in KiB on Linux; time(1) writes a "Command exited" line first on failure.
        lines = rss.read().split()
        max_rss_kib = int(lines[-1]) if wrapped is not argv and lines else usage.ru_maxrss
        out.seek(0)
        err.seek(0)
        return ProcessRun(proc.returncode, seconds, max_rss_kib / 1024, out.read(), err.read())


def create_master(dsn: str, slot: str) -> None:
    """Create the pgoutput slot that every measured run copies (and that nobody consumes)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def copy_slot(dsn: str, master: str, slot: str) -> None:
    """(Re)create ``slot`` as a copy of ``master``: same start, same plugin."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop_slot(conn, slot)
        conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s, false)", (master, slot))


def drop_slot(conn: psycopg.Connection, slot: str) -> None:
    """Drop ``slot`` if it exists."""
    if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone():
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def current_lsn(dsn: str) -> str:
    """Return the server's current WAL insert position (the end of what was just written)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def stream_changes(dsn: str, master: str, publication: str, upto: str) -> tuple[int, int]:
    """Count the row changes (and truncated tables) in the master's stream up to ``upto``.

    One server-side peek that never leaves the server: the reference count the journal
    must match. Returns (I/U/D messages, relations in Truncate messages).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE get_byte(data, 0) IN (73, 85, 68)),"
            " coalesce(sum(('x' || encode(substring(data from 2 for 4), 'hex'))::bit(32)::int)"
            " FILTER (WHERE get_byte(data, 0) = 84), 0)"
            " FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, NULL,"
            " 'proto_version', '1', 'publication_names', %s)",
            (master, upto, publication),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def wal_bytes(dsn: str, start: str, end: str) -> int:
    """Return the WAL written between two LSNs."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)::int8", (end, start)).fetchone()
    assert row is not None
    return int(row[0])


def slot_position(dsn: str, slot: str) -> str:
    """Return a slot's confirmed_flush_lsn."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def run_recvlogical(
    cluster: LocalCluster, dbname: str, *, master: str, publication: str, endpos: str, out: Path
) -> ProcessRun:
    """Stream a fresh copy of ``master`` with ``pg_recvlogical`` (pgoutput v1) into ``out``."""
    slot = f"{master}_recv"
    copy_slot(cluster.dsn(dbname), master, slot)
    out.unlink(missing_ok=True)
    try:
        run = timed(
            [str(cluster.bindir / "pg_recvlogical"), "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "postgres", "-d", dbname, "-S", slot, "--start", "-E", endpos, "--no-loop",
             "-f", str(out), "-o", "proto_version=1", "-o", f"publication_names={publication}"]
        )  # fmt: skip
    finally:
        with psycopg.connect(cluster.dsn(dbname), autocommit=True) as conn:
            drop_slot(conn, slot)
    if run.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({run.returncode}): {run.stderr.strip()[-500:]}")
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError("pg_recvlogical wrote nothing")
    return run


def syncagent_argv(config: Path, *args: str) -> list[str]:
    """The real CLI, in this interpreter's environment."""
    exe = Path(sys.executable).with_name("syncagent")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli"]
    return [*base, "-c", str(config), *args]


def syncagent(config: Path, *args: str) -> ProcessRun:
    """Run a syncagent command; raise with its stderr when it fails."""
    run = timed(syncagent_argv(config, *args))
    if run.returncode != 0:
        tail = run.stderr.strip()[-800:]
        raise RuntimeError(f"syncagent {' '.join(args)} failed ({run.returncode}): {tail}")
    return run


def fresh_state(state_path: Path) -> None:
    """Remove the state file and its WAL/SHM companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{state_path}{suffix}").unlink(missing_ok=True)


def run_agent(
    cluster: LocalCluster,
    dbname: str,
    *,
    master: str,
    slot: str,
    config: Path,
    state_path: Path,
    full_cycle: bool = False,
) -> AgentRun:
    """Drain a fresh copy of ``master`` (named as the agent's slot) into a fresh journal.

    ``run --once`` captures, then resolves and delivers. Unless ``full_cycle``, the process
    is stopped (SIGTERM) as soon as it logs the end of its capture cycle: the capture is
    committed by then, and resolving is not what this benchmark measures (the resolver's
    transaction is rolled back). Peak RSS is the process's ``VmHWM`` at that moment.
    """
    copy_slot(cluster.dsn(dbname), master, slot)
    fresh_state(state_path)
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            syncagent_argv(config, "run", "--once"), stdout=out, stderr=subprocess.PIPE, text=True
        )
        assert proc.stderr is not None
        lines: list[str] = []
        captured: re.Match[str] | None = None
        at_capture = hwm = 0.0
        for line in proc.stderr:
            lines.append(line)
            if captured is None and (captured := _CAPTURE_MS.search(line)) is not None:
                at_capture = time.perf_counter() - started
                hwm = _vm_hwm_mib(proc.pid)
                if not full_cycle:
                    proc.send_signal(signal.SIGTERM)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    stderr = "".join(lines)
    stopped = not full_cycle and proc.returncode == -signal.SIGTERM
    if captured is None or (proc.returncode != 0 and not stopped):
        raise RuntimeError(f"syncagent run --once failed ({proc.returncode}): {stderr.strip()[-800:]}")
    run = ProcessRun(proc.returncode, seconds if full_cycle else at_capture,
                     hwm or usage.ru_maxrss / 1024, stdout, stderr)  # fmt: skip
    return AgentRun(run, int(captured.group(2)) / 1000, int(captured.group(1)), journal_rows(state_path))


def _vm_hwm_mib(pid: int) -> float:
    """Return a live process's peak resident set size (``VmHWM``), or 0 where /proc has none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def journal_rows(state_path: Path) -> int:
    """Count the journal's rows through the state API (all sources)."""
    from state import journal, open_state

    st = open_state(state_path, readonly=True)
    try:
        return sum(s.count for s in journal.stats(st).values())
    finally:
        st.close()

"""Crash tests for the capture invariant: journal commit first, slot advance after.

A child process captures through the real pipeline and is SIGKILLed at a chosen point;
a restart must lose nothing and journal nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from tests.erp import erp_only_config, load_erp

pytestmark = pytest.mark.pg

CHILD = textwrap.dedent("""
    import os, signal, sys
    from agent import pipeline
    from agent.daemon import build_runtime, open_config
    from state import open_state

    class KillOnCommit:
        '''Delegates to the real source; SIGKILLs itself on commit number N (after the journal commit).'''
        def __init__(self, source, n):
            self.source, self.n, self.calls = source, n, 0
            self.name = source.name
        def streams(self):
            return self.source.streams()
        def read(self, stream, cursor, *, limit):
            return self.source.read(stream, cursor, limit=limit)
        def commit(self, stream, cursor):
            self.calls += 1
            if self.calls >= self.n:
                os.kill(os.getpid(), signal.SIGKILL)
            self.source.commit(stream, cursor)

    cfg = open_config(sys.argv[1])
    rt = build_runtime(cfg)
    st = open_state(cfg.agent.state_path)
    pipeline.capture(KillOnCommit(rt.sources["erp"], int(sys.argv[2])), st, "wal")
    print("not killed")
""")


def run_child(tmp_path: Path, cfg: Path, kill_on_commit: int) -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), str(cfg), str(kill_on_commit)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        timeout=120,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def journal_positions(cfg: Path) -> list[str]:
    res = CliRunner().invoke(cli, ["-c", str(cfg), "journal", "--json", "--limit", "100000"])
    return [e["position"] for e in json.loads(res.stdout)["entries"]]


def confirmed_flush(dsn: str, slot: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        assert row is not None
        return str(row[0])


@pytest.fixture
def erp(pg_dsn: str, tmp_path: Path) -> tuple[str, Path, str]:
    load_erp(pg_dsn)
    cfg = erp_only_config(tmp_path, pg_dsn, extra="")
    text = cfg.read_text().replace('origin = "', 'chunk_rows = 1000\norigin = "', 1)
    cfg.write_text(text)
    assert CliRunner().invoke(cli, ["-c", str(cfg), "init"]).exit_code == 0
    return pg_dsn, cfg, pg_dsn.split("dbname=")[1]


def test_capture_loses_and_duplicates_nothing_when_killed_after_journal_commit(
    erp: tuple[str, Path, str], tmp_path: Path
) -> None:
    dsn, cfg, slot = erp
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i in range(20):
            conn.execute("INSERT INTO erp.customers (name) SELECT 'c' || g FROM generate_series(1, 50) g")
            if i % 5 == 0:
                conn.execute("UPDATE erp.customers SET status = 'hold' WHERE id % 7 = 0")
    before = confirmed_flush(dsn, slot)
    assert run_child(tmp_path, cfg, kill_on_commit=1) == -signal.SIGKILL
    journaled = journal_positions(cfg)
    assert len(journaled) > 0
    assert confirmed_flush(dsn, slot) == before, "killed before the advance: the slot must not have moved"
    res = CliRunner().invoke(cli, ["-c", str(cfg), "run", "--once"])
    assert res.exit_code == 0, res.output
    after = journal_positions(cfg)
    assert len(after) == len(set(after)), "a change was journaled twice"
    assert set(journaled) <= set(after)
    with psycopg.connect(dsn) as conn:
        updated = conn.execute("SELECT count(*) FROM erp.customers WHERE id % 7 = 0").fetchone()
    assert updated is not None
    inserts = 1000
    # every insert, and every row each of the 4 updates touched, exactly once
    assert len(after) > inserts
    assert confirmed_flush(dsn, slot) != before


def test_capture_of_one_big_transaction_resumes_exactly_once_when_killed_mid_transaction(
    erp: tuple[str, Path, str], tmp_path: Path
) -> None:
    dsn, cfg, _slot = erp
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) SELECT 'big' || g FROM generate_series(1, 5000) g")
    # chunk_rows = 1000: the 5000-row transaction spans several batches; die after the second one.
    assert run_child(tmp_path, cfg, kill_on_commit=2) == -signal.SIGKILL
    partial = journal_positions(cfg)
    assert 0 < len(partial) < 5000
    res = CliRunner().invoke(cli, ["-c", str(cfg), "run", "--once"])
    assert res.exit_code == 0, res.output
    after = journal_positions(cfg)
    assert len(after) == 5000 and len(set(after)) == 5000
    assert set(partial) <= set(after)

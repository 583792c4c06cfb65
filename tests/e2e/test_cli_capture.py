"""The capture path through the CLI, against a real PostgreSQL with wal_level=logical."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from tests.erp import erp_only_config, load_erp

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


def sa(cfg: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-c", str(cfg), *args], catch_exceptions=False)
    return res.exit_code, res.stdout


@pytest.fixture
def erp(pg_dsn: str, tmp_path: Path) -> tuple[str, Path]:
    load_erp(pg_dsn)
    return pg_dsn, erp_only_config(tmp_path, pg_dsn)


def test_init_dry_run_prints_the_ddl_and_changes_nothing(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    code, out = sa(cfg, "init", "--dry-run")
    assert code == 0
    slot = dsn.split("dbname=")[1]
    assert f'CREATE PUBLICATION "{slot}" FOR TABLE "erp"."contracts", "erp"."customers"' in out
    assert f"pg_create_logical_replication_slot('{slot}', 'pgoutput')" in out
    with psycopg.connect(dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone() == (0,)


def test_init_is_idempotent_when_run_twice(erp: tuple[str, Path]) -> None:
    _, cfg = erp
    code, out = sa(cfg, "init", "--json")
    assert code == 0 and len(json.loads(out)["statements"]["erp"]) == 4
    code, out = sa(cfg, "init", "--json")
    assert code == 0 and json.loads(out)["statements"]["erp"] == []


def test_run_once_journals_every_committed_change_with_typed_values(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    sa(cfg, "init")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO erp.customers (customer_no, name, credit_limit) VALUES ('C-1', 'Acme', 100.50)"
        )
        conn.execute("UPDATE erp.customers SET status = 'hold' WHERE customer_no = 'C-1'")
        conn.execute("DELETE FROM erp.customers WHERE customer_no = 'C-1'")
    code, out = sa(cfg, "run", "--once")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["captured"] == {"erp": 3}
    code, out = sa(cfg, "journal", "--json")
    entries = json.loads(out)["entries"]
    assert [e["op"] for e in entries] == ["insert", "update", "delete"]
    assert entries[0]["fields"]["credit_limit"] == "100.50"
    assert entries[0]["fields"]["name"] == "Acme" and entries[2]["key"] == {"id": 1}
    assert all(e["origin"] is None for e in entries)


def test_status_json_shows_cursor_lag_and_changes_when_healthy(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    sa(cfg, "init")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) SELECT 'n' || g FROM generate_series(1, 5) g")
    assert sa(cfg, "run", "--once")[0] == 0
    code, out = sa(cfg, "status", "--json")
    snap = json.loads(out)
    assert code == 0 and snap["ok"] is True
    wal = next(s for s in snap["streams"] if s["stream"] == "wal")
    assert wal["changes_total"] == 5 and wal["cursor"]["lsn"].count("/") == 1
    assert isinstance(wal["lag_bytes"], int)
    assert snap["resolver"]["backlog"] == 0


def test_status_exits_1_and_names_the_fix_when_never_polled(erp: tuple[str, Path]) -> None:
    _, cfg = erp
    sa(cfg, "init")
    code, out = sa(cfg, "status", "--json")
    snap = json.loads(out)
    assert code == 1 and snap["ok"] is False
    assert "run --once" in snap["streams"][0]["fix"]


def test_checkpoint_list_json_has_a_stable_envelope(erp: tuple[str, Path]) -> None:
    _, cfg = erp
    sa(cfg, "init")
    sa(cfg, "run", "--once")
    code, out = sa(cfg, "checkpoint", "list", "--json")
    body = json.loads(out)
    assert code == 0 and body["ok"] is True
    assert {(c["owner"], c["stream"]) for c in body["checkpoints"]} >= {("source:erp", "wal")}


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[systems.erp]\ntype = 'postgres'\nport = 'many'\n")
    res = CliRunner().invoke(cli, ["-c", str(cfg), "status", "--json"])
    body = json.loads(res.stdout)
    assert res.exit_code == 2 and body["ok"] is False
    assert any(str(cfg) in e and "systems.erp.port" in e for e in body["errors"])


def test_rewind_of_postgres_is_a_resync_and_dry_run_by_default(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    sa(cfg, "init")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) SELECT 'n' || g FROM generate_series(1, 7) g")
    sa(cfg, "run", "--once")
    code, out = sa(cfg, "checkpoint", "rewind", "erp", "--to", "all", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["dry_run"] is True and plan["plan"]["kind"] == "resync"
    code, out = sa(cfg, "checkpoint", "rewind", "erp/erp.customers", "--to", "all", "--yes", "--json")
    assert code == 0 and json.loads(out)["rows_journaled"] == 7
    code, out = sa(cfg, "journal", "--json", "--limit", "100")
    ops = [e["op"] for e in json.loads(out)["entries"]]
    assert ops.count("insert") == 7 and ops.count("read") == 7


@pytest.mark.skipif(os.geteuid() != 0, reason="hands files to another user: needs root (CI runs as root)")
def test_init_as_root_hands_the_state_file_to_the_state_folders_owner(erp: tuple[str, Path]) -> None:
    _, cfg = erp
    from agent.config import load_config

    state_dir = load_config(cfg).agent.state_path.parent
    state_dir.mkdir(mode=0o700)
    pw = pwd.getpwnam("postgres")
    os.chown(state_dir, pw.pw_uid, pw.pw_gid)
    assert sa(cfg, "init")[0] == 0
    assert os.stat(state_dir / "state.db").st_uid == pw.pw_uid


def test_run_once_captures_a_transaction_larger_than_one_polls_wal_cap(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    cfg.write_text(cfg.read_text().replace('origin = "', 'max_poll_mb = 1\norigin = "', 1))
    sa(cfg, "init")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name, notes) SELECT 'big ' || g, repeat('x', 100)"
                     " FROM generate_series(1, 30000) g")
        wal = conn.execute("SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots"
                           " WHERE slot_name = %s", (dsn.split("dbname=")[1],)).fetchone()
    assert wal is not None and wal[0] > 2 * 2**20, "the transaction must span several polls' caps"
    code, out = sa(cfg, "run", "--once")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["captured"] == {"erp": 30000}

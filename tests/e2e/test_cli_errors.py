"""Bad input through the CLI: a clear message naming the thing and the fix, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.localpg import free_port
from tests.erp import erp_only_config, load_erp

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


def sa(cfg: Path, *args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, ["-c", str(cfg), *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def erp(pg_dsn: str, tmp_path: Path) -> tuple[str, Path]:
    load_erp(pg_dsn)
    return pg_dsn, erp_only_config(tmp_path, pg_dsn)


def test_check_names_a_table_without_primary_key_and_the_alter_table_fix(pg_dsn: str, tmp_path: Path) -> None:
    load_erp(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE erp.contracts DROP CONSTRAINT contracts_pkey CASCADE")
    cfg = erp_only_config(tmp_path, pg_dsn)
    code, out, _ = sa(cfg, "check", "--json")
    body = json.loads(out)
    assert code == 1 and body["ok"] is False
    problems = body["systems"]["erp"]
    assert any("erp.contracts" in p["subject"] + p["message"] and "REPLICA IDENTITY" in p["fix"].upper()
               for p in problems), problems


def test_check_names_a_missing_table(pg_dsn: str, tmp_path: Path) -> None:
    load_erp(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE erp.contract_revisions, erp.contracts CASCADE")
    code, out, _ = sa(erp_only_config(tmp_path, pg_dsn), "check", "--json")
    assert code == 1
    assert any("erp.contracts" in p["subject"] + p["message"] for p in json.loads(out)["systems"]["erp"])


def test_check_reports_an_unreachable_server_as_a_problem_not_a_traceback(tmp_path: Path) -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=postgres dbname=erp"
    code, out, _ = sa(erp_only_config(tmp_path, dsn), "check", "--json")
    body = json.loads(out)
    assert code == 1 and body["ok"] is False
    text = json.dumps(body)
    assert "127.0.0.1" in text


def test_run_once_reports_a_dropped_slot_with_the_resync_fix_and_keeps_the_journal(erp: tuple[str, Path]) -> None:
    dsn, cfg = erp
    sa(cfg, "init")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO erp.customers (name) VALUES ('a'), ('b')")
    assert sa(cfg, "run", "--once")[0] == 0
    slot = dsn.split("dbname=")[1]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    code, out, _ = sa(cfg, "run", "--once")
    assert code == 1
    failure = json.loads(out.strip().splitlines()[-1])["failures"]["erp"]
    assert slot in failure and "init" in failure
    code, out, _ = sa(cfg, "status", "--json")
    snap = json.loads(out)
    assert code == 1 and "rewind" in snap["streams"][0]["fix"]
    assert len(json.loads(sa(cfg, "journal", "--json")[1])["entries"]) == 2


def test_wrong_credentials_exit_1_with_the_role_named(pg_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pg_cluster.createdb("creds")
    with psycopg.connect(pg_cluster.dsn("creds"), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS nobody_here")
    cfg = erp_only_config(tmp_path, pg_cluster.dsn("creds").replace("user=postgres", "user=nobody_here"))
    code, out, _ = sa(cfg, "check", "--json")
    assert code == 1 and "nobody_here" in out


@pytest.mark.parametrize("body,key", [
    ("[systems.erp]\ntype = 'postgres'\ndbname = 'x'\nuser = 'u'\nslot = 'x; DROP TABLE y'\n", "systems.erp.slot"),
    ("[systems.erp]\ntype = 'postgres'\ndbname = 'x'\nuser = 'u'\n[entities.c.systems.erp]\nobject = 'erp.c'\n"
     "key = 'id'\nrow_filter = \"id IN (SELECT 1)\"\n[entities.c.fields]\nn = {owner = 'erp', erp = 'n'}\n",
     "entities.c.systems.erp.row_filter"),
    ("[systems.erp]\ntype = 'postgres'\ndbname = 'x'\nuser = 'u'\n[entities.c.systems.erp]\nobject = 'erp.c'\n"
     "key = 'id'\nrow_filter = \"true; DROP TABLE erp.c\"\n[entities.c.fields]\nn = {owner = 'erp', erp = 'n'}\n",
     "entities.c.systems.erp.row_filter"),
    ("[systems.erp]\ntype = 'postgres'\ndbname = 'x'\nuser = 'u'\n[entities.c.systems.erp]\nobject = 'customers'\n"
     "key = 'id'\n[entities.c.fields]\nn = {owner = 'erp', erp = 'n'}\n", "entities.c.systems.erp.object"),
])
def test_bad_config_exits_2_naming_the_key_and_touches_no_state(tmp_path: Path, body: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[agent]\nstate_path = '{tmp_path / 'st' / 'state.db'}'\n" + body)
    for args in (["status", "--json"], ["init", "--json"], ["run", "--once"]):
        res = CliRunner().invoke(cli, ["-c", str(cfg), *args])
        assert res.exit_code == 2, (args, res.output)
        assert key in res.output and str(cfg) in res.output
    assert not (tmp_path / "st").exists()

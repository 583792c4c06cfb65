"""ERP (real PostgreSQL) <-> Salesforce (its emulator as a real server), through the whole pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from tests.erp import add_sf_fields, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


class Env:
    def __init__(self, dsn: str, cfg: Path, sf: SalesforceEmulator) -> None:
        self.dsn, self.cfg, self.sf = dsn, cfg, sf

    def cli(self, *args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args], catch_exceptions=False)
        return res.exit_code, res.stdout

    def cycle(self, n: int = 1) -> dict:
        """Run ``n`` full cycles; the emulator's clock moves past the connector's safety lag first."""
        out: dict = {}
        for _ in range(n):
            self.sf.shift_clock(timedelta(seconds=3))
            code, text = self.cli("run", "--once")
            out = json.loads(text.strip().splitlines()[-1])
            assert code == 0, out
        return out

    def sql(self, query: str, *args: object) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def writes(self) -> int:
        return len([r for r in self.sf.requests() if "/composite/sobjects" in r.path])


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    sf = SalesforceEmulator()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        cfg = sync_config(tmp_path, pg_dsn, server.url)
        e = Env(pg_dsn, cfg, sf)
        assert e.cli("init")[0] == 0
        yield e


def test_sync_erp_customer_reaches_salesforce_and_its_echo_is_dropped(env: Env) -> None:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name, phone, credit_limit, status)"
        " VALUES ('C-1', 'Acme', '+49 30 1', 1000.50, 'hold')"
    )
    env.cycle()
    accounts = env.sf.all("Account")
    assert len(accounts) == 1
    acct = accounts[0]
    assert acct["Name"] == "Acme" and acct["AccountNumber"] == "C-1" and acct["Status__c"] == "On Hold"
    assert Decimal(str(acct["Credit_Limit__c"])) == Decimal("1000.50")
    assert acct["ERP_Id__c"] == "1"
    # the CRM id is written back into the ERP row, in a session tagged with our origin
    env.cycle()
    assert env.sql("SELECT crm_id FROM erp.customers") == [(acct["Id"],)]
    writes = env.writes()
    env.cycle(2)
    assert env.writes() == writes, "an echo was sent back: ping-pong"
    code, out = env.cli("journal", "--json", "--limit", "1000")
    fates = [e["fate"] for e in json.loads(out)["entries"]]
    assert "echo" in fates and fates[0] == "applied"
    code, out = env.cli("status", "--json")
    assert json.loads(out)["api"]["crm"]["calls"] > 0


def test_sync_salesforce_account_creates_an_erp_customer_with_its_crm_id(env: Env) -> None:
    sid = env.sf.insert("Account", {"Name": "Globex", "Phone": "+33 1", "Status__c": "Active"})
    env.cycle(2)
    rows = env.sql("SELECT id, name, phone, status, crm_id FROM erp.customers")
    assert rows == [(1, "Globex", "+33 1", "active", sid)]
    assert env.sf.get("Account", sid)["ERP_Id__c"] == "1"
    code, out = env.cli("xref", "lookup", "customer", "crm", sid, "--json")
    assert json.loads(out)["members"] == {"crm": sid, "erp": "1"}
    before = env.sql("SELECT xmin::text FROM erp.customers")
    env.cycle(2)
    assert env.sql("SELECT xmin::text FROM erp.customers") == before, "the ERP row was written again"


def test_sync_ownership_drops_a_crm_edit_of_an_erp_owned_field_and_audits_it(env: Env) -> None:
    env.sql("INSERT INTO erp.customers (customer_no, name, status) VALUES ('C-7', 'Initech', 'active')")
    env.cycle(2)
    sid = env.sf.all("Account")[0]["Id"]
    env.sf.update("Account", sid, {"Status__c": "On Hold", "Name": "Initech Intl"})
    env.cycle(2)
    assert env.sql("SELECT name, status FROM erp.customers") == [("Initech Intl", "active")]
    with psycopg.connect(env.dsn):
        pass
    from agent.config import load_config
    from state import audit, open_state

    st = open_state(load_config(env.cfg).agent.state_path, readonly=True)
    rows = audit.list_records(st, action="ownership_ignored")
    st.close()
    assert len(rows) == 1 and rows[0].detail["field"] == "status"
    assert rows[0].detail["new_value"] == "hold" and rows[0].detail["source"] == "crm"


def test_sync_shared_field_conflict_is_won_by_the_latest_change_and_audited(env: Env) -> None:
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-9', 'Hooli', '111')")
    env.cycle(2)
    sid = env.sf.all("Account")[0]["Id"]
    env.sql("UPDATE erp.customers SET phone = '222'")
    env.sf.update("Account", sid, {"Phone": "333"})
    env.cycle(3)
    erp_phone = env.sql("SELECT phone FROM erp.customers")[0][0]
    assert erp_phone == env.sf.get("Account", sid)["Phone"], "the two sides did not converge"
    from agent.config import load_config
    from state import audit, open_state

    st = open_state(load_config(env.cfg).agent.state_path, readonly=True)
    conflicts = audit.list_records(st, action="conflict_resolved")
    st.close()
    assert conflicts and {conflicts[0].detail["new_value"], conflicts[0].detail["other_value"]} == {
        "222",
        "333",
    }


def test_sync_rejected_record_goes_to_exceptions_and_retry_applies_it_after_the_fix(env: Env) -> None:
    env.sf.schemas["Account"].add_rule(
        lambda rec: (
            ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "blocked name", ["Name"])
            if rec.get("Name") == "Bad"
            else None
        )
    )
    env.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, CASE WHEN g = 7 THEN 'Bad'"
        " ELSE 'Good ' || g END FROM generate_series(1, 20) g"
    )
    out = env.cycle()
    assert out["rejected"]["crm"] == 1 and out["applied"]["crm"] == 19
    code, text = env.cli("exceptions", "list", "--json")
    items = json.loads(text)["items"]
    assert len(items) == 1 and items[0]["reason"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert items[0]["trace_id"] and items[0]["record"]["fields"]["Name"] == "Bad"
    env.sf.schemas["Account"].rules.clear()
    code, text = env.cli("exceptions", "retry", str(items[0]["id"]), "--json")
    assert code == 0
    env.cycle()
    assert sorted(a["AccountNumber"] for a in env.sf.all("Account")) == sorted(f"C-{g}" for g in range(1, 21))


def test_sync_waits_while_salesforce_fails_and_resumes_without_loss(env: Env) -> None:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g FROM generate_series(1, 5) g"
    )
    env.sf.fail_next(50, status=503)
    code, text = env.cli("run", "--once")
    assert code == 1 and "crm" in json.loads(text.strip().splitlines()[-1])["failures"]
    assert env.sf.all("Account") == []
    env.sf.clear_faults()
    env.sf.expire_all_tokens()
    env.cycle(2)
    assert len(env.sf.all("Account")) == 5


def test_sync_batches_salesforce_writes_200_records_a_request(env: Env) -> None:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g FROM generate_series(1, 450) g"
    )
    before = env.writes()
    env.cycle()
    assert len(env.sf.all("Account")) == 450
    assert env.writes() - before == 3


def test_sync_defers_visibly_when_the_api_budget_is_spent(env: Env) -> None:
    env.cfg.write_text(
        env.cfg.read_text().replace("lookback_seconds = 5", "lookback_seconds = 5\nbudget_per_run = 1")
    )
    env.sql("INSERT INTO erp.customers (customer_no, name) VALUES ('C-1', 'Acme')")
    env.sf.shift_clock(timedelta(seconds=3))
    code, text = env.cli("run", "--once")
    assert code == 1 and "BudgetExhausted" in json.dumps(
        json.loads(text.strip().splitlines()[-1])["failures"]
    )
    code, out = env.cli("status", "--json")
    crm = [s for s in json.loads(out)["streams"] if s["connector"] == "crm"]
    assert crm and all(s["state"] == "deferred" for s in crm), crm
    assert "budget" in crm[0]["fix"]


def test_sync_rewinding_salesforce_rereads_and_changes_nothing_twice(env: Env) -> None:
    for n in range(3):
        env.sf.insert("Account", {"Name": f"Rewound {n}"})
    env.cycle(2)
    assert len(env.sql("SELECT id FROM erp.customers")) == 3
    code, out = env.cli("checkpoint", "rewind", "crm", "--to", "2h", "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and plan["kind"] == "api" and set(plan["new"]) == {"Account", "Opportunity"}
    code, out = env.cli("checkpoint", "rewind", "crm", "--to", "2h", "--yes", "--json")
    assert code == 0
    writes, rows = env.writes(), env.sql("SELECT id, xmin::text FROM erp.customers ORDER BY id")
    out = env.cycle(2)
    assert env.sql("SELECT id, xmin::text FROM erp.customers ORDER BY id") == rows
    assert env.writes() == writes
    code, out = env.cli("checkpoint", "list", "--json")
    gens = {(c["owner"], c["stream"]): c["generation"] for c in json.loads(out)["checkpoints"]}
    assert gens[("source:crm", "Account")] == 2

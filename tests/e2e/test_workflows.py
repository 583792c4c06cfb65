"""Closed-won -> ERP set-up, end to end: real PostgreSQL, the Salesforce emulator as a server, the CLI.

The config is the demo's (every workflow on); reference data is loaded by a resync, as an
operator would after ``init``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import load_config
from agent.demo.seed import crm_env, deal_fields, make_crm, write_config
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from state import exceptions, open_state, outbox, workflows
from tests.erp import dsn_parts, load_erp

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


class Env:
    """One ERP database, one emulator, one state file, driven through the CLI."""

    def __init__(self, dsn: str, cfg: Path, sf: SalesforceEmulator) -> None:
        self.dsn, self.cfg, self.sf = dsn, cfg, sf

    def cli(self, *args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args], catch_exceptions=False)
        return res.exit_code, res.stdout

    def json(self, *args: str) -> Any:
        code, out = self.cli(*args, "--json")
        assert code == 0, out
        return json.loads(out)

    def cycle(self, n: int = 1) -> dict[str, Any]:
        """Run ``n`` full cycles; the emulator's clock first moves past the connector's safety lag."""
        out: dict[str, Any] = {}
        for _ in range(n):
            self.sf.shift_clock(timedelta(seconds=3))
            code, text = self.cli("run", "--once")
            out = json.loads(text.strip().splitlines()[-1])
            assert code == 0, out
        return out

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def counts(self) -> tuple[int, int, int, int]:
        return self.sql(
            "SELECT (SELECT count(*) FROM erp.customers), (SELECT count(*) FROM erp.contracts),"
            " (SELECT count(*) FROM erp.projects), (SELECT count(*) FROM erp.contract_revisions)"
        )[0]

    def crm_writes(self) -> int:
        return len([r for r in self.sf.requests() if "/composite/sobjects" in r.path])

    def state(self) -> Any:
        return open_state(load_config(self.cfg).agent.state_path, readonly=True)

    def open_items(self) -> list[Any]:
        st = self.state()
        try:
            return exceptions.list_items(st, status="open")
        finally:
            st.close()

    def instances(self, workflow: str | None = None) -> list[Any]:
        st = self.state()
        try:
            return workflows.list_instances(st, workflow=workflow)
        finally:
            st.close()

    def account(self, name: str = "Acme Consulting GmbH", number: str = "C-10042") -> str:
        return self.sf.insert("Account", {"Name": name, "AccountNumber": number})

    def deal(self, account: str, stage: str = "Negotiation", **overrides: Any) -> str:
        fields = deal_fields("Acme - ERP rollout", account, stage, "48000.00")
        return self.sf.insert("Opportunity", {**fields, **overrides})

    def win(self, opp: str, cycles: int = 2) -> None:
        self.sf.update("Opportunity", opp, {"StageName": "Closed Won"})
        self.cycle(cycles)


@pytest.fixture
def wf_env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    for k, v in crm_env().items():
        monkeypatch.setenv(k, v)
    load_erp(pg_dsn)
    sf = make_crm()
    with EmulatorServer(sf) as server:
        p = dsn_parts(pg_dsn)
        cfg = write_config(
            tmp_path / "demo.toml",
            db=p,
            sf_url=server.url,
            state_path=tmp_path / "state" / "state.db",
            slot=p["dbname"],
        )
        env = Env(pg_dsn, cfg, sf)
        assert env.cli("init")[0] == 0
        code, out = env.cli("checkpoint", "rewind", "erp", "--to", "all", "--yes")
        assert code == 0 and "6 rows journaled" in out, out
        yield env


def test_closed_won_creates_customer_contract_and_project_in_one_transaction_when_a_deal_is_won(
    wf_env: Env,
) -> None:
    env = wf_env
    account = env.account()
    opp = env.deal(account)
    other = env.deal(account, stage="Proposal", Name="Acme - Phase 2")
    env.cycle()
    assert env.counts() == (0, 0, 0, 0), "an open deal (or its account) reached the ERP"
    env.win(opp)
    customers = env.sql("SELECT id, name, customer_no, crm_id FROM erp.customers")
    contracts = env.sql(
        "SELECT id, customer_id, title, value, currency, billing_type, legal_entity, tax_code, version,"
        " delivery_status, crm_id FROM erp.contracts"
    )
    projects = env.sql(
        "SELECT id, project_code, contract_id, customer_id, service_line, status FROM erp.projects"
    )
    assert customers == [(1, "Acme Consulting GmbH", "C-10042", account)]
    assert contracts == [
        (1, 1, "Acme - ERP rollout", 48000, "EUR", "fixed_fee", "ACME-DE", "DE-VAT19", 1, "setup", opp)
    ]
    assert projects == [(1, f"IMPL-{opp}", 1, 1, "IMPL", "setup")]
    entries = env.json("journal", "--limit", "1000", "--source", "erp")["entries"]
    inserted = {e["object"]: e["version"] for e in entries if e["op"] == "insert"}
    assert set(inserted) == {"erp.customers", "erp.contracts", "erp.projects"}
    assert len(set(inserted.values())) == 1, "not one ERP transaction (commit LSNs differ)"
    o = env.sf.get("Opportunity", opp) or {}
    assert (o["ERP_Id__c"], o["ERP_Project_Id__c"], o["Delivery_Status__c"]) == ("1", "1", "setup")
    assert (env.sf.get("Account", account) or {})["ERP_Id__c"] == "1"
    assert (env.sf.get("Opportunity", other) or {})["ERP_Id__c"] is None
    [inst] = env.instances("closed_won")
    assert inst.status == "completed" and inst.latency_seconds is not None
    steps = [s["step"] for s in inst.steps]
    assert steps[:3] == ["validated", "queued:erp", "erp:unit"]
    assert sorted(steps[3:]) == ["crm:Account", "crm:Opportunity"]
    trigger = [e for e in env.json("journal", "--limit", "1000")["entries"] if e["seq"] == inst.trigger_seq]
    assert trigger[0]["object"] == "Opportunity" and trigger[0]["trace_id"] == inst.trace_id
    assert env.open_items() == []


def test_closed_won_links_the_erp_customer_when_it_already_exists(wf_env: Env) -> None:
    env = wf_env
    account = env.account()
    opp = env.deal(account)
    env.cycle()
    env.sql("INSERT INTO erp.customers (customer_no, name) VALUES ('C-10042', 'Acme Consulting')")
    env.cycle()  # linked to the CRM account by its customer number (the natural key)
    env.win(opp)
    assert env.sql("SELECT id, customer_no FROM erp.customers") == [(1, "C-10042")]
    assert env.sql("SELECT customer_id FROM erp.contracts") == [(1,)]
    assert env.sql("SELECT customer_id, contract_id FROM erp.projects") == [(1, 1)]


VALIDATIONS = [
    pytest.param(
        {"Legal_Entity__c": "ACME-FR"},
        "missing_legal_entity",
        "legal_entity:ACME-FR",
        "ACME-FR",
        "INSERT INTO erp.legal_entities VALUES ('ACME-FR', 'Acme Conseil SARL', '{EUR}')",
        id="legal_entity_mapping_missing",
    ),
    pytest.param(
        {"Tax_Code__c": "DE-VAT7"},
        "missing_tax_code",
        "tax_code:DE-VAT7",
        "DE-VAT7",
        "INSERT INTO erp.tax_codes VALUES ('DE-VAT7', 0.07, 'ACME-DE')",
        id="tax_code_unknown",
    ),
    pytest.param(
        {"Service_Line__c": "CLOUD"},
        "missing_service_line",
        "service_line:CLOUD",
        "CLOUD",
        "INSERT INTO erp.service_lines VALUES ('CLOUD', 'Cloud migration', 'TPL-CLOUD')",
        id="service_line_template_unknown",
    ),
    pytest.param(
        {"CurrencyIsoCode": "USD"},
        "currency_not_allowed",
        "legal_entity:ACME-DE",
        "USD",
        "UPDATE erp.legal_entities SET currencies = '{EUR,USD}' WHERE code = 'ACME-DE'",
        id="currency_not_allowed_for_entity",
    ),
]


@pytest.mark.parametrize("overrides,reason,blocking_ref,named,fix", VALIDATIONS)
def test_closed_won_parks_the_deal_and_creates_nothing_then_releases_it_when_the_reference_appears(
    wf_env: Env, overrides: dict[str, str], reason: str, blocking_ref: str, named: str, fix: str
) -> None:
    env = wf_env
    opp = env.deal(env.account(), **overrides)
    env.cycle()
    env.win(opp)
    env.sf.update("Opportunity", opp, {"Probability": 90})
    env.cycle(2)  # the deal changes again while parked: still one item, not a second one
    [item] = env.open_items()
    assert (item.kind, item.reason, item.blocking_ref) == ("validation", reason, blocking_ref)
    assert named in item.detail and item.entity == "contract" and item.attempts >= 2
    assert env.counts() == (0, 0, 0, 0), "something was created for a parked deal"
    assert [(i.workflow, i.status) for i in env.instances()] == [("closed_won", "parked")]
    env.sql(fix)
    env.cycle(2)
    assert env.counts() == (1, 1, 1, 0)
    assert env.open_items() == []
    st = env.state()
    try:
        closed = exceptions.get(st, item.id)
    finally:
        st.close()
    assert closed is not None and closed.status == "resolved" and closed.resolved_by == "agent"
    assert [(i.workflow, i.status) for i in env.instances()] == [("closed_won", "completed")]
    assert (env.sf.get("Opportunity", opp) or {})["ERP_Project_Id__c"] == "1"


def test_closed_won_creates_nothing_twice_when_the_resolver_is_rewound_and_the_sources_reread(
    wf_env: Env,
) -> None:
    env = wf_env
    opp = env.deal(env.account())
    env.cycle()
    env.win(opp, cycles=3)
    rows = env.sql(
        "SELECT (SELECT array_agg(xmin::text) FROM erp.customers), (SELECT array_agg(xmin::text)"
        " FROM erp.contracts), (SELECT array_agg(xmin::text) FROM erp.projects)"
    )
    writes = env.crm_writes()
    assert env.cli("checkpoint", "rewind", "resolver", "--seq", "0", "--yes")[0] == 0
    assert env.cli("checkpoint", "rewind", "crm", "--to", "1h", "--yes")[0] == 0
    assert env.cli("checkpoint", "rewind", "erp", "--to", "all", "--yes")[0] == 0
    env.cycle(3)
    assert env.counts() == (1, 1, 1, 0)
    assert (
        env.sql(
            "SELECT (SELECT array_agg(xmin::text) FROM erp.customers), (SELECT array_agg(xmin::text)"
            " FROM erp.contracts), (SELECT array_agg(xmin::text) FROM erp.projects)"
        )
        == rows
    ), "an ERP row was written again"
    assert env.crm_writes() == writes, "the CRM was written again"
    assert len(env.instances("closed_won")) == 1 and env.open_items() == []


def test_closed_won_redelivery_after_a_crash_finds_the_rows_and_creates_nothing_twice(wf_env: Env) -> None:
    from agent.daemon import build_runtime, open_config

    env = wf_env
    opp = env.deal(env.account())
    env.cycle()
    env.win(opp)
    st = env.state()
    try:
        [inst] = workflows.list_instances(st, workflow="closed_won")
        unit = next(
            row.op
            for op_id in range(1, 100)
            if (row := outbox.get(st, op_id)) is not None and row.op.action == "unit"
        )
    finally:
        st.close()
    # As if the agent had died after the ERP committed but before the outbox heard of it.
    rt = build_runtime(open_config(env.cfg))
    try:
        [again] = rt.sinks["erp"].apply([unit])
    finally:
        rt.close()
    assert again.status == "applied" and json.loads(again.external_id or "") == ["1", "1", "1"]
    assert again.version is None, "the redelivered unit wrote a row"
    assert env.counts() == (1, 1, 1, 0)
    assert inst.status == "completed"


def test_closed_won_rolls_the_whole_unit_back_when_one_step_fails_and_retries_it_after_the_fix(
    wf_env: Env,
) -> None:
    env = wf_env
    env.sql(
        "CREATE FUNCTION erp.no_projects() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'projects are closed for the year-end'; END $$"
    )
    env.sql(
        "CREATE TRIGGER no_projects BEFORE INSERT ON erp.projects FOR EACH ROW EXECUTE FUNCTION erp.no_projects()"
    )
    opp = env.deal(env.account())
    env.cycle()
    env.win(opp)
    assert env.counts() == (0, 0, 0, 0), "a step before the failing one was kept"
    [item] = env.open_items()
    assert item.kind == "rejected_by_target" and "step 2 (erp.projects)" in item.detail
    assert [i.status for i in env.instances("closed_won")] == ["failed"]
    env.sql("DROP TRIGGER no_projects ON erp.projects")
    code, out = env.cli("exceptions", "retry", str(item.id))
    assert code == 0, out
    env.cycle(2)
    assert env.counts() == (1, 1, 1, 0)
    assert [i.status for i in env.instances("closed_won")] == ["completed"]


def test_workflows_lists_instances_with_their_latency_as_json_and_as_a_table(wf_env: Env) -> None:
    env = wf_env
    opp = env.deal(env.account())
    env.cycle()
    env.win(opp)
    payload = env.json("workflows")
    assert payload["ok"] is True
    [inst] = payload["instances"]
    assert inst["workflow"] == "closed_won" and inst["status"] == "completed"
    assert inst["trigger"]["object"] == "Opportunity" and inst["trigger"]["journal_seq"]
    assert inst["latency_s"] is not None and inst["trace_id"]
    assert payload["latency"]["closed_won"]["completed"] == 1
    code, text = env.cli("workflows")
    assert code == 0 and "closed_won" in text and "completed" in text and "p95" in text

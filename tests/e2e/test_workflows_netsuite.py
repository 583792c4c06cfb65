"""Closed-won with NetSuite as the ERP: Salesforce deal -> NetSuite customer, contract and job.

The workflow is the demo's (tests/e2e/test_workflows.py) unchanged; only the config maps the
entities onto NetSuite: the contract onto a custom record type (``customrecord_contract``),
the project onto ``job`` with two custom entity fields, the reference data onto custom
records. NetSuite has no multi-record transaction, so the sink runs the unit as a saga of
upserts by external id: these tests show a replay, a 5xx at the project step and a refusal
at the project step, each leaving exactly one customer, contract and job.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.demo.seed import CLIENT_ID_ENV, CLIENT_SECRET_ENV, crm_env, deal_fields, make_crm
from connectors.emulator import EmulatorServer
from connectors.netsuite.emulator import NetSuiteEmulator, ns_error
from state import open_state, workflows
from tests.e2e.test_sync_vendors import NetSuiteEnv, netsuite_write, writes

pytestmark = pytest.mark.e2e

_STAGES = (
    "prospecting = 'Prospecting', negotiation = 'Negotiation', proposal = 'Proposal', lost = 'Closed Lost'"
)
_REFERENCES = ("legal_entity", "tax_code", "service_line")


def closed_won_netsuite_config(tmp_path: Path, ns_url: str, sf_url: str) -> Path:
    """The demo's closed-won entities with NetSuite as the ERP and the demo's Salesforce as the CRM."""
    references = "".join(
        f"""
[entities.{name}.systems.erp]
object = "customrecord_{name}"
key = "id"
match_on = "code"

[entities.{name}.fields]
code = {{owner = "erp", erp = "custrecord_code"}}
"""
        + ('currencies = {owner = "erp", erp = "custrecord_currencies"}\n' if name == "legal_entity" else "")
        for name in _REFERENCES
    )
    path = tmp_path / "closed_won_netsuite.toml"
    path.write_text(
        f"""
[agent]
state_path = "{tmp_path / "state" / "state.db"}"
retry_base_seconds = 0.01
retry_cap_seconds = 0.05

[systems.erp]
type = "netsuite"
base_url = "{ns_url}"
account = "1234567"
client_id = {{env = "NS_CLIENT_ID"}}
certificate_id = "syncagent-cert"
private_key = {{env = "NS_PRIVATE_KEY"}}
signing_algorithm = "HS256"

[systems.crm]
type = "salesforce"
instance_url = "{sf_url}"
client_id = {{env = "{CLIENT_ID_ENV}"}}
client_secret = {{env = "{CLIENT_SECRET_ENV}"}}
lookback_seconds = 5

[entities.customer]
on_non_owner_edit = "ignore"

[entities.customer.systems.erp]
object = "customer"
key = "id"
external_id = "externalid"
match_on = "customer_no"

[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "companyname", crm = "Name"}}
customer_no = {{owner = "crm", erp = "entityid", crm = "AccountNumber"}}

[entities.contract]
on_non_owner_edit = "ignore"

[entities.contract.systems.erp]
object = "customrecord_contract"
key = "id"
external_id = "externalid"

[entities.contract.systems.crm]
object = "Opportunity"
key = "Id"
external_id = "ERP_Id__c"

[entities.contract.fields]
title = {{owner = "crm", erp = "name", crm = "Name"}}
customer = {{owner = "crm", ref = "customer", erp = "custrecord_customer", crm = "AccountId"}}
value = {{owner = "erp", type = "decimal", erp = "custrecord_value", crm = "Amount"}}
currency = {{owner = "crm", erp = "custrecord_currency", crm = "CurrencyIsoCode"}}
legal_entity = {{owner = "crm", erp = "custrecord_legal_entity", crm = "Legal_Entity__c"}}
tax_code = {{owner = "crm", erp = "custrecord_tax_code", crm = "Tax_Code__c"}}
service_line = {{owner = "crm", crm = "Service_Line__c"}}
close_date = {{owner = "crm", type = "date", erp = "custrecord_signed_on", crm = "CloseDate"}}
stage = {{owner = "crm", crm = "StageName", values = {{crm = {{won = "Closed Won", {_STAGES.replace("'", '"')}}}}}}}
version = {{owner = "erp", type = "int", erp = "custrecord_version"}}
delivery_status = {{owner = "erp", erp = "custrecord_delivery_status", crm = "Delivery_Status__c"}}

[entities.project.systems.erp]
object = "job"
key = "id"
match_on = "project_code"

[entities.project.fields]
project_code = {{owner = "erp", erp = "companyname"}}
contract = {{owner = "erp", ref = "contract", erp = "custentity_contract"}}
customer = {{owner = "erp", ref = "customer", erp = "parent"}}
service_line = {{owner = "erp", erp = "custentity_service_line"}}
status = {{owner = "erp", erp = "entitystatus", values = {{erp = {{setup = "2", active = "3"}}}}}}
{references}
[workflows.closed_won]
project_code = "{{service_line}}-{{crm_id}}"
crm_project_field = "ERP_Project_Id__c"
"""
    )
    return path


def netsuite_erp() -> NetSuiteEmulator:
    """A NetSuite account with the custom records and fields the config maps, and its reference data."""
    ns = NetSuiteEmulator()
    ns.define_record(
        "customrecord_contract",
        {
            "custrecord_customer": "ref:customer",
            "custrecord_value": "number",
            "custrecord_currency": "text",
            "custrecord_legal_entity": "text",
            "custrecord_tax_code": "text",
            "custrecord_signed_on": "date",
            "custrecord_version": "number",
            "custrecord_delivery_status": "text",
        },
    )
    ns.add_fields(
        "job", {"custentity_contract": "ref:customrecord_contract", "custentity_service_line": "text"}
    )
    for name in _REFERENCES:
        ns.define_record(f"customrecord_{name}", {"custrecord_code": "text", "custrecord_currencies": "text"})
    ns.insert(
        "customrecord_legal_entity",
        {"name": "Acme GmbH", "custrecord_code": "ACME-DE", "custrecord_currencies": "EUR,GBP"},
    )
    ns.insert("customrecord_tax_code", {"name": "VAT 19%", "custrecord_code": "DE-VAT19"})
    ns.insert("customrecord_service_line", {"name": "Implementation", "custrecord_code": "IMPL"})
    return ns


class WonEnv(NetSuiteEnv):
    """NetSuite (ERP) and the demo's Salesforce (CRM), both emulated, driven through the CLI."""

    def json(self, *args: str) -> Any:
        """Run a read command with ``--json``; its parsed output."""
        code, out = self.cli(*args, "--json")
        assert code == 0, out
        return json.loads(out)

    def ns_writes(self) -> int:
        """NetSuite record-service writes so far."""
        return writes(self.ns, netsuite_write)

    def set_up(self) -> tuple[str, str]:
        """An account and an open deal, captured; their Salesforce ids."""
        account = self.sf.insert("Account", {"Name": "Acme Consulting GmbH", "AccountNumber": "C-10042"})
        opp = self.sf.insert(
            "Opportunity", deal_fields("Acme - ERP rollout", account, "Negotiation", "48000.00")
        )
        self.cycle()
        return account, opp

    def win(self, opp: str, cycles: int = 2) -> None:
        """Move the deal to Closed Won and run ``cycles`` cycles."""
        self.sf.update("Opportunity", opp, {"StageName": "Closed Won"})
        self.cycle(cycles)

    def counts(self) -> tuple[int, int, int]:
        """NetSuite customers, contracts and jobs."""
        return tuple(len(self.ns.all(t)) for t in ("customer", "customrecord_contract", "job"))  # type: ignore[return-value]

    def instances(self) -> list[Any]:
        """The closed-won workflow instances in the state file."""
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            return workflows.list_instances(st, workflow="closed_won")
        finally:
            st.close()

    def open_items(self) -> list[dict[str, Any]]:
        """Open exception items, as ``syncagent exceptions list --json`` shows them."""
        items: list[dict[str, Any]] = self.json("exceptions", "list")["items"]
        return items


@pytest.fixture
def won(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WonEnv]:
    """The two emulators as loopback servers and ``syncagent init`` done; no PostgreSQL."""
    monkeypatch.setenv("NS_CLIENT_ID", "syncagent-client")
    monkeypatch.setenv("NS_PRIVATE_KEY", "emulator-secret")
    for k, v in crm_env().items():
        monkeypatch.setenv(k, v)
    ns, sf = netsuite_erp(), make_crm()
    with EmulatorServer(ns) as ns_server, EmulatorServer(sf) as sf_server:
        env = WonEnv(closed_won_netsuite_config(tmp_path, ns_server.url, sf_server.url), ns=ns, sf=sf)
        env.clocks += [(ns, timedelta(seconds=3)), (sf, timedelta(seconds=3))]
        assert env.cli("init")[0] == 0
        yield env


def _assert_set_up(env: WonEnv, account: str, opp: str) -> tuple[str, str, str]:
    """Exactly one customer, contract and job, linked to each other and written back to Salesforce."""
    [customer], [contract], [job] = (env.ns.all(t) for t in ("customer", "customrecord_contract", "job"))
    cid, kid, jid = str(customer["id"]), str(contract["id"]), str(job["id"])
    assert (customer["companyname"], customer["entityid"], customer["externalid"]) == (
        "Acme Consulting GmbH",
        "C-10042",
        account,
    )
    assert contract["externalid"] == opp and contract["custrecord_customer"] == cid
    assert (contract["name"], contract["custrecord_value"], contract["custrecord_currency"]) == (
        "Acme - ERP rollout",
        Decimal("48000"),
        "EUR",
    )
    assert (contract["custrecord_version"], contract["custrecord_delivery_status"]) == (Decimal(1), "setup")
    code = f"IMPL-{opp}"
    assert (job["companyname"], job["externalid"], job["parent"], job["custentity_contract"]) == (
        code,
        code,
        cid,
        kid,
    )
    assert (job["custentity_service_line"], job["entitystatus"]) == ("IMPL", "2")
    o = env.sf.get("Opportunity", opp) or {}
    assert (o["ERP_Id__c"], o["ERP_Project_Id__c"], o["Delivery_Status__c"]) == (kid, jid, "setup")
    assert (env.sf.get("Account", account) or {})["ERP_Id__c"] == cid
    return cid, kid, jid


def test_closed_won_creates_customer_contract_and_job_in_netsuite_when_a_salesforce_deal_is_won(
    won: WonEnv,
) -> None:
    """One won deal: three NetSuite upserts by external id, the ERP ids written back to Salesforce."""
    env = won
    account, opp = env.set_up()
    assert env.counts() == (0, 0, 0), "an open deal (or its account) reached NetSuite"
    before = env.ns_writes()
    env.win(opp)
    assert env.open_items() == []
    _assert_set_up(env, account, opp)
    assert env.ns_writes() - before == 3, "a closed-won deal should cost three NetSuite writes"
    [inst] = env.instances()
    assert inst.status == "completed" and inst.latency_seconds is not None
    assert [s["step"] for s in inst.steps][:3] == ["validated", "queued:erp", "erp:unit"]


def test_closed_won_replay_creates_nothing_twice_when_the_journal_is_rewound(won: WonEnv) -> None:
    """Rewinding the resolver and the CRM re-reads the won deal: no new record, no new write."""
    env = won
    account, opp = env.set_up()
    env.win(opp)
    ids = _assert_set_up(env, account, opp)
    env.cycle()
    writes_before = (env.ns_writes(), len([r for r in env.sf.requests() if "/composite/sobjects" in r.path]))
    assert env.cli("checkpoint", "rewind", "resolver", "--seq", "0", "--yes")[0] == 0
    assert env.cli("checkpoint", "rewind", "crm", "--to", "1h", "--yes")[0] == 0
    env.cycle(2)
    assert _assert_set_up(env, account, opp) == ids
    after = (env.ns_writes(), len([r for r in env.sf.requests() if "/composite/sobjects" in r.path]))
    assert after == writes_before, "a replay wrote again"
    assert env.open_items() == []


def test_closed_won_retries_and_completes_without_duplicates_when_the_job_step_meets_a_5xx(
    won: WonEnv,
) -> None:
    """A 503 on the job upsert leaves customer and contract; the retry finds them and adds the job."""
    env = won
    account, opp = env.set_up()
    env.ns.inject(
        ns_error(503, "UNEXPECTED_ERROR", "An unexpected error occurred."),
        path_prefix="/services/rest/record/v1/job/",
        method="PUT",
    )
    env.win(opp, cycles=1)
    env.cycle(2)
    assert env.open_items() == []
    _assert_set_up(env, account, opp)
    puts = [r for r in env.ns.requests() if r.method == "PUT" and r.path.startswith("/services/rest/record")]
    assert [r.status for r in puts if "/job/" in r.path] == [503, 204]
    assert len(puts) == 6, "a new process repeats the two found steps (upserts), then the job"


def test_closed_won_parks_an_exception_naming_the_step_and_the_kept_records_when_netsuite_refuses_the_job(
    won: WonEnv,
) -> None:
    """A refused job status: the exception names step 2 and the customer and contract already there."""
    env = won
    env.ns.allow("job", "entitystatus", ("1",))
    account, opp = env.set_up()
    env.win(opp)
    [item] = env.open_items()
    [customer], [contract] = env.ns.all("customer"), env.ns.all("customrecord_contract")
    assert env.ns.all("job") == []
    assert (item["kind"], item["reason"]) == ("rejected_by_target", "USER_ERROR")
    detail = item["detail"]
    assert detail.startswith("step 2 (job): Invalid value for the field entityStatus.")
    assert f"step 0 customer id {customer['id']}" in detail
    assert f"step 1 customrecord_contract id {contract['id']}" in detail
    # The operator fixes NetSuite and retries: the replay finds both and adds only the job.
    env.ns.allow("job", "entitystatus", ("1", "2"))
    assert env.cli("exceptions", "retry", str(item["id"]))[0] == 0
    env.cycle(2)
    _assert_set_up(env, account, opp)

"""The same sync engine over other vendor pairs, through ``syncagent run --once``.

(a) ERP PostgreSQL <-> CRM HubSpot (companies, deals), (b) ERP PostgreSQL <-> CRM Dynamics
365 (accounts), (c) ERP NetSuite (customer) <-> CRM Salesforce (Account). Every emulator
runs as a real loopback server; a change on either side reaches the other, and counting
each emulator's write requests shows that nothing is echoed back. Then closed-won with
HubSpot as the CRM (the demo's workflow config, tests/e2e/test_workflows.py, over HubSpot).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from connectors.dynamics import DynamicsEmulator
from connectors.emulator import EmulatorApp, EmulatorServer, LoggedRequest
from connectors.hubspot import HubSpotEmulator
from connectors.netsuite.emulator import NetSuiteEmulator
from connectors.postgres import drop
from connectors.salesforce.emulator import SalesforceEmulator
from tests.erp import add_sf_fields, dsn_parts, load_erp, sync_config

pytestmark = pytest.mark.e2e

WriteFilter = Callable[[LoggedRequest], bool]


@dataclass
class Env:
    """A config, the emulators it points at (with the clock step each needs per cycle), an ERP DSN."""

    cfg: Path
    clocks: list[tuple[EmulatorApp, timedelta]] = field(default_factory=list)
    dsn: str | None = None

    def cli(self, *args: str) -> tuple[int, str]:
        """Run one ``syncagent`` command in process; its exit code and stdout."""
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args], catch_exceptions=False)
        return res.exit_code, res.stdout

    def cycle(self, n: int = 1) -> dict[str, Any]:
        """Run ``n`` cycles; emulator clocks first move past their connector's safety lag."""
        out: dict[str, Any] = {}
        for _ in range(n):
            for emu, step in self.clocks:
                emu.shift_clock(step)
            code, text = self.cli("run", "--once")
            out = json.loads(text.strip().splitlines()[-1])
            assert code == 0, out
        return out

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Run SQL on the ERP database; the rows, if any."""
        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def xref(self, entity: str, system: str, external_id: str) -> dict[str, str]:
        """The cross-reference members of one record, through ``syncagent xref lookup``."""
        code, out = self.cli("xref", "lookup", entity, system, external_id, "--json")
        assert code == 0, out
        members: dict[str, str] = json.loads(out)["members"]
        return members


def drop_slot(dsn: str) -> None:
    """Drop the test database's slot, publication and origin: slots are cluster-wide and capped."""
    name = dsn_parts(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        drop(conn, name, name, name)


def writes(emu: EmulatorApp, is_write: WriteFilter) -> int:
    """How many write requests the emulator has answered."""
    return sum(1 for r in emu.requests() if is_write(r))


def hubspot_write(r: LoggedRequest) -> bool:
    """A HubSpot request that changes data (batch reads and searches are POSTs too)."""
    return (
        r.path.startswith("/crm/")
        and r.method in ("POST", "PATCH", "PUT", "DELETE")
        and not r.path.endswith(("/search", "/batch/read"))
    )


def dynamics_write(r: LoggedRequest) -> bool:
    """A Dataverse Web API request that changes data."""
    return r.path.startswith("/api/data") and r.method in ("POST", "PATCH", "DELETE")


def netsuite_write(r: LoggedRequest) -> bool:
    """A NetSuite record-service request that changes data."""
    return r.path.startswith("/services/rest/record") and r.method in ("POST", "PUT", "PATCH", "DELETE")


def salesforce_write(r: LoggedRequest) -> bool:
    """A Salesforce sObject Collections write."""
    return "/composite/sobjects" in r.path


def _agent(tmp_path: Path) -> str:
    return f"""
[agent]
state_path = "{tmp_path / "state" / "state.db"}"
retry_base_seconds = 0.01
retry_cap_seconds = 0.05
"""


def _erp_pg(dsn: str) -> str:
    p = dsn_parts(dsn)
    return f"""
[systems.erp]
type = "postgres"
host = "{p["host"]}"
port = {p["port"]}
dbname = "{p["dbname"]}"
user = "{p["user"]}"
slot = "{p["dbname"]}"
publication = "{p["dbname"]}"
origin = "{p["dbname"]}"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
match_on = "customer_no"
updated_at = "updated_at"
"""


def hubspot_config(tmp_path: Path, dsn: str, url: str) -> Path:
    """ERP (PostgreSQL) <-> HubSpot: companies <-> erp.customers, deals <-> erp.contracts."""
    path = tmp_path / "hubspot.toml"
    path.write_text(
        _agent(tmp_path)
        + _erp_pg(dsn)
        + f"""
[systems.crm]
type = "hubspot"
base_url = "{url}"
token = {{env = "HS_TOKEN"}}
lookback_seconds = 5
search_rate_per_s = 1000.0

[entities.customer.systems.crm]
object = "companies"
key = "id"
external_id = "erp_id"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "name"}}
customer_no = {{owner = "erp", erp = "customer_no", crm = "customer_no"}}
phone = {{owner = "shared", erp = "phone", crm = "phone"}}

[entities.contract.systems.erp]
object = "erp.contracts"
key = "id"
external_id = "crm_id"

[entities.contract.systems.crm]
object = "deals"
key = "id"
external_id = "erp_id"

[entities.contract.fields]
title = {{owner = "crm", erp = "title", crm = "dealname"}}
value = {{owner = "crm", type = "decimal", erp = "value", crm = "amount"}}
delivery_status = {{owner = "erp", erp = "delivery_status", crm = "delivery_status"}}
"""
    )
    return path


def dynamics_config(tmp_path: Path, dsn: str, url: str) -> Path:
    """ERP (PostgreSQL) <-> Dynamics 365: accounts <-> erp.customers."""
    path = tmp_path / "dynamics.toml"
    path.write_text(
        _agent(tmp_path)
        + _erp_pg(dsn)
        + f"""
[systems.crm]
type = "dynamics"
base_url = "{url}"
tenant = "contoso-tenant"
token_url = "{url}/contoso-tenant/oauth2/v2.0/token"
client_id = {{env = "DV_CLIENT_ID"}}
client_secret = {{env = "DV_CLIENT_SECRET"}}
lookback_seconds = 5

[entities.customer.systems.crm]
object = "accounts"
key = "accountid"
external_id = "erp_customerid"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "name"}}
customer_no = {{owner = "erp", erp = "customer_no", crm = "accountnumber"}}
phone = {{owner = "shared", erp = "phone", crm = "telephone1"}}
"""
    )
    return path


def netsuite_config(tmp_path: Path, ns_url: str, sf_url: str) -> Path:
    """ERP NetSuite (customer) <-> CRM Salesforce (Account)."""
    path = tmp_path / "netsuite.toml"
    path.write_text(
        _agent(tmp_path)
        + f"""
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
client_id = {{env = "SF_CLIENT_ID"}}
client_secret = {{env = "SF_CLIENT_SECRET"}}
lookback_seconds = 5

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
customer_no = {{owner = "erp", erp = "entityid", crm = "AccountNumber"}}
"""
    )
    return path


@dataclass
class HubSpotEnv(Env):
    """ERP PostgreSQL and the HubSpot emulator."""

    hs: HubSpotEmulator = field(default_factory=HubSpotEmulator)

    def writes(self) -> int:
        """Write requests HubSpot answered."""
        return writes(self.hs, hubspot_write)

    def props(self, obj: str, record_id: str) -> dict[str, str]:
        """Every property of one record (the emulator's ``get`` renders only the default ones)."""
        return dict(self.hs.store.record(obj, record_id, archived=None).props)

    def ids(self, obj: str) -> list[str]:
        """Ids of the live records of ``obj``."""
        return [r["id"] for r in self.hs.all(obj)]


@dataclass
class DynamicsEnv(Env):
    """ERP PostgreSQL and the Dataverse emulator."""

    dv: DynamicsEmulator = field(default_factory=DynamicsEmulator)

    def writes(self) -> int:
        """Write requests Dataverse answered."""
        return writes(self.dv, dynamics_write)


@dataclass
class NetSuiteEnv(Env):
    """ERP NetSuite and CRM Salesforce, both emulated."""

    ns: NetSuiteEmulator = field(default_factory=NetSuiteEmulator)
    sf: SalesforceEmulator = field(default_factory=SalesforceEmulator)

    def writes(self) -> tuple[int, int]:
        """Write requests answered by (NetSuite, Salesforce)."""
        return writes(self.ns, netsuite_write), writes(self.sf, salesforce_write)


@pytest.fixture
def hubspot(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubSpotEnv]:
    """The demo ERP schema, the HubSpot emulator (private-app token) and ``syncagent init`` done."""
    monkeypatch.setenv("HS_TOKEN", "pat-na1-emulator")
    load_erp(pg_dsn)
    hs = HubSpotEmulator(search_rate_per_s=1000, burst_limit=10_000)
    hs.define_property("companies", "customer_no")
    hs.define_property("deals", "delivery_status")
    with EmulatorServer(hs) as server:
        env = HubSpotEnv(hubspot_config(tmp_path, pg_dsn, server.url), dsn=pg_dsn, hs=hs)
        env.clocks.append((hs, timedelta(seconds=6)))  # the connector's safety lag is 5 s
        assert env.cli("init")[0] == 0
        yield env
    drop_slot(pg_dsn)


@pytest.fixture
def dynamics(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamicsEnv]:
    """The demo ERP schema, the Dataverse emulator (Entra ID client credentials) and init done."""
    monkeypatch.setenv("DV_CLIENT_ID", "syncagent")
    monkeypatch.setenv("DV_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    dv = DynamicsEmulator()
    with EmulatorServer(dv) as server:
        env = DynamicsEnv(dynamics_config(tmp_path, pg_dsn, server.url), dsn=pg_dsn, dv=dv)
        assert env.cli("init")[0] == 0
        yield env
    drop_slot(pg_dsn)


@pytest.fixture
def netsuite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NetSuiteEnv]:
    """The NetSuite (M2M) and Salesforce (client credentials) emulators; no PostgreSQL."""
    monkeypatch.setenv("NS_CLIENT_ID", "syncagent-client")
    monkeypatch.setenv("NS_PRIVATE_KEY", "emulator-secret")
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    ns, sf = NetSuiteEmulator(), SalesforceEmulator()
    with EmulatorServer(ns) as ns_server, EmulatorServer(sf) as sf_server:
        env = NetSuiteEnv(netsuite_config(tmp_path, ns_server.url, sf_server.url), ns=ns, sf=sf)
        # Small steps only: NetSuite's token endpoint checks the assertion's real-time exp against it.
        env.clocks += [(ns, timedelta(seconds=3)), (sf, timedelta(seconds=3))]  # SF's safety lag is 2 s
        assert env.cli("init")[0] == 0
        yield env


# --- (a) ERP PostgreSQL <-> HubSpot -------------------------------------------------------------


@pytest.mark.pg
def test_sync_hubspot_erp_customer_reaches_a_company_and_a_crm_rename_comes_back_without_echo(
    hubspot: HubSpotEnv,
) -> None:
    """An ERP customer becomes a HubSpot company, linked both ways; a CRM rename reaches the ERP; no echo."""
    env = hubspot
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-1', 'Acme', '+49 30 1')")
    env.cycle()
    (company,) = env.ids("companies")
    props = env.props("companies", company)
    assert (props["name"], props["customer_no"], props["phone"], props["erp_id"]) == (
        "Acme",
        "C-1",
        "+49 30 1",
        "1",
    )
    env.cycle()
    assert env.sql("SELECT crm_id FROM erp.customers") == [(company,)]
    assert env.xref("customer", "crm", company) == {"crm": company, "erp": "1"}
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back to HubSpot"
    env.hs.update("companies", company, {"name": "Acme Group"})
    env.cycle(2)
    assert env.sql("SELECT name FROM erp.customers") == [("Acme Group",)]
    assert env.writes() == before, "the ERP write came back to HubSpot"


@pytest.mark.pg
def test_sync_hubspot_company_creates_an_erp_customer_and_an_erp_edit_goes_back_without_echo(
    hubspot: HubSpotEnv,
) -> None:
    """A HubSpot company becomes an ERP customer, linked both ways; an ERP-owned edit reaches HubSpot once."""
    env = hubspot
    cid = env.hs.insert("companies", {"name": "Globex", "phone": "+33 1"})
    env.cycle(2)
    assert env.sql("SELECT id, name, phone, crm_id FROM erp.customers") == [(1, "Globex", "+33 1", cid)]
    assert env.props("companies", cid)["erp_id"] == "1"
    xmin = env.sql("SELECT xmin::text FROM erp.customers")
    env.cycle(2)
    assert env.sql("SELECT xmin::text FROM erp.customers") == xmin, "the ERP row was written again"
    before = env.writes()
    env.sql("UPDATE erp.customers SET customer_no = 'C-77'")
    env.cycle(2)
    assert env.props("companies", cid)["customer_no"] == "C-77"
    assert env.writes() == before + 1
    env.cycle(2)
    assert env.writes() == before + 1, "an echo was sent back to HubSpot"


@pytest.mark.pg
def test_sync_hubspot_deal_becomes_an_erp_contract_and_its_delivery_status_flows_back(
    hubspot: HubSpotEnv,
) -> None:
    """A HubSpot deal becomes an ERP contract; the ERP's delivery status flows back to the deal; no echo."""
    env = hubspot
    did = env.hs.insert(
        "deals", {"dealname": "Acme rollout", "amount": "48000.50", "dealstage": "contractsent"}
    )
    env.cycle(2)
    assert env.sql("SELECT title, value, delivery_status, crm_id FROM erp.contracts") == [
        ("Acme rollout", Decimal("48000.50"), "not_started", did)
    ]
    assert env.props("deals", did)["erp_id"] == "1"
    env.sql("UPDATE erp.contracts SET delivery_status = 'in_progress'")
    env.cycle(2)
    assert env.props("deals", did)["delivery_status"] == "in_progress"
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back to HubSpot"


@pytest.mark.pg
def test_sync_hubspot_deal_reaches_the_erp_as_a_contract_of_its_associated_company(
    hubspot: HubSpotEnv,
) -> None:
    """A deal associated with a company reaches the ERP as a contract of that company's customer."""
    env = hubspot
    # A deal's company is an association, which HubSpot changes carry as associated_company_id.
    field = 'customer = {owner = "crm", ref = "customer", erp = "customer_id", crm = "associated_company_id"}'
    env.cfg.write_text(env.cfg.read_text() + field + "\n")
    company = env.hs.insert("companies", {"name": "Acme"})
    deal = env.hs.insert("deals", {"dealname": "Acme rollout", "amount": "9000", "dealstage": "contractsent"})
    env.hs.associate("deals", deal, "companies", company)
    env.cycle(3)
    assert env.sql("SELECT crm_id FROM erp.customers") == [(company,)]
    assert env.sql("SELECT c.crm_id FROM erp.contracts k JOIN erp.customers c ON c.id = k.customer_id") == [
        (company,)
    ], "the contract did not get its customer"


@dataclass
class SalesforceEnv(Env):
    """ERP PostgreSQL and the Salesforce emulator (tests/erp.py's sync config)."""

    sf: SalesforceEmulator = field(default_factory=SalesforceEmulator)


@pytest.fixture
def salesforce(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SalesforceEnv]:
    """The reference pair, where no vendor gap hides what resolve does with a not-yet-linked reference."""
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    sf = SalesforceEmulator()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        env = SalesforceEnv(sync_config(tmp_path, pg_dsn, server.url), dsn=pg_dsn, sf=sf)
        env.clocks.append((sf, timedelta(seconds=3)))
        assert env.cli("init")[0] == 0
        yield env
    drop_slot(pg_dsn)


@pytest.mark.pg
def test_sync_a_deal_created_with_its_new_account_reaches_the_erp_once_the_account_is_linked(
    salesforce: SalesforceEnv,
) -> None:
    """A deal whose account is new waits for the account's ERP id, then reaches the ERP; it is not dropped."""
    env = salesforce
    account = env.sf.insert("Account", {"Name": "Acme"})
    deal = env.sf.insert(
        "Opportunity",
        {
            "Name": "Acme rollout",
            "AccountId": account,
            "StageName": "Proposal",
            "CloseDate": "2026-06-30",
            "Amount": Decimal("9000"),
        },
    )
    env.cycle(4)
    assert env.sql("SELECT crm_id FROM erp.customers") == [(account,)]
    assert env.sql(
        "SELECT k.crm_id, c.crm_id FROM erp.contracts k JOIN erp.customers c ON c.id = k.customer_id"
    ) == [(deal, account)], (
        "the deal was parked for its account and then resolved as 'noop': it never reached the ERP"
    )


# --- (b) ERP PostgreSQL <-> Dynamics 365 --------------------------------------------------------


@pytest.mark.pg
def test_sync_dynamics_erp_customer_reaches_an_account_and_a_crm_rename_comes_back_without_echo(
    dynamics: DynamicsEnv,
) -> None:
    """An ERP customer becomes a Dataverse account, linked both ways; a CRM rename reaches the ERP; no echo."""
    env = dynamics
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-1', 'Acme', '+49 30 1')")
    env.cycle()
    (account,) = env.dv.all("accounts")
    assert (account["name"], account["accountnumber"], account["telephone1"]) == ("Acme", "C-1", "+49 30 1")
    assert account["erp_customerid"] == "1"
    env.cycle()
    assert env.sql("SELECT crm_id FROM erp.customers") == [(account["accountid"],)]
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back to Dataverse"
    env.dv.update("accounts", account["accountid"], {"name": "Acme Group"})
    env.cycle(2)
    assert env.sql("SELECT name FROM erp.customers") == [("Acme Group",)]
    assert env.writes() == before, "the ERP write came back to Dataverse"


@pytest.mark.pg
def test_sync_dynamics_account_creates_an_erp_customer_and_an_erp_edit_goes_back_without_echo(
    dynamics: DynamicsEnv,
) -> None:
    """A Dataverse account becomes an ERP customer, linked both ways; an ERP-owned edit reaches it once."""
    env = dynamics
    aid = env.dv.insert("accounts", {"name": "Globex", "telephone1": "+33 1"})
    env.cycle(2)
    assert env.sql("SELECT id, name, phone, crm_id FROM erp.customers") == [(1, "Globex", "+33 1", aid)]
    assert (env.dv.get("accounts", aid) or {})["erp_customerid"] == "1"
    xmin = env.sql("SELECT xmin::text FROM erp.customers")
    env.cycle(2)
    assert env.sql("SELECT xmin::text FROM erp.customers") == xmin, "the ERP row was written again"
    before = env.writes()
    env.sql("UPDATE erp.customers SET customer_no = 'C-77'")
    env.cycle(2)
    assert (env.dv.get("accounts", aid) or {})["accountnumber"] == "C-77"
    assert env.writes() == before + 1
    env.cycle(2)
    assert env.writes() == before + 1, "an echo was sent back to Dataverse"


# --- (c) ERP NetSuite <-> Salesforce ------------------------------------------------------------


def test_sync_netsuite_customer_reaches_salesforce_and_a_crm_rename_comes_back_without_echo(
    netsuite: NetSuiteEnv,
) -> None:
    """A NetSuite customer becomes a Salesforce account, linked both ways; a CRM rename reaches NetSuite."""
    env = netsuite
    nid = env.ns.insert("customer", {"entityid": "C-1", "companyname": "Acme"})
    env.cycle()
    (account,) = env.sf.all("Account")
    assert (account["Name"], account["AccountNumber"], account["ERP_Id__c"]) == ("Acme", "C-1", nid)
    env.cycle()
    assert (env.ns.get("customer", nid) or {})["externalid"] == account["Id"]
    assert env.xref("customer", "erp", nid) == {"crm": account["Id"], "erp": nid}
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back"
    env.sf.update("Account", account["Id"], {"Name": "Acme Group"})
    env.cycle(2)
    assert (env.ns.get("customer", nid) or {})["companyname"] == "Acme Group"
    assert env.writes() == (before[0] + 1, before[1]), "the NetSuite write came back to Salesforce"


def test_sync_salesforce_account_creates_a_netsuite_customer_and_an_erp_edit_goes_back_without_echo(
    netsuite: NetSuiteEnv,
) -> None:
    """A Salesforce account becomes a NetSuite customer, linked both ways; an ERP edit reaches it once."""
    env = netsuite
    sid = env.sf.insert("Account", {"Name": "Globex", "AccountNumber": "C-9"})
    env.cycle(2)
    (customer,) = env.ns.all("customer")
    nid = str(customer["id"])
    assert (customer["companyname"], customer["externalid"]) == ("Globex", sid)
    assert (env.sf.get("Account", sid) or {})["ERP_Id__c"] == nid
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back"
    env.ns.update("customer", nid, {"entityid": "C-10"})
    env.cycle(2)
    assert (env.sf.get("Account", sid) or {})["AccountNumber"] == "C-10"
    assert env.writes() == (before[0], before[1] + 1), "the Salesforce write came back to NetSuite"


# --- closed-won -> ERP set-up with HubSpot as the CRM ---------------------------------------------

_HUBSPOT_STAGES = (
    "appointmentscheduled",
    "qualifiedtobuy",
    "presentationscheduled",
    "decisionmakerboughtin",
    "contractsent",
    "closedlost",
)


def closed_won_config(tmp_path: Path, dsn: str, url: str) -> Path:
    """The demo's closed-won set-up (tests/e2e/test_workflows.py) with HubSpot in place of Salesforce."""
    stages = ", ".join(f'{s} = "{s}"' for s in _HUBSPOT_STAGES)
    path = tmp_path / "closed_won.toml"
    path.write_text(
        _agent(tmp_path)
        + _erp_pg(dsn)
        + f"""
[systems.crm]
type = "hubspot"
base_url = "{url}"
token = {{env = "HS_TOKEN"}}
lookback_seconds = 5
search_rate_per_s = 1000.0

[entities.customer.systems.crm]
object = "companies"
key = "id"
external_id = "erp_id"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "name"}}
customer_no = {{owner = "crm", erp = "customer_no", crm = "customer_no"}}

[entities.contract]
on_non_owner_edit = "ignore"

[entities.contract.systems.erp]
object = "erp.contracts"
key = "id"
external_id = "crm_id"
updated_at = "updated_at"

[entities.contract.systems.crm]
object = "deals"
key = "id"
external_id = "erp_id"

[entities.contract.fields]
title = {{owner = "crm", erp = "title", crm = "dealname"}}
customer = {{owner = "crm", ref = "customer", erp = "customer_id", crm = "associated_company_id"}}
value = {{owner = "erp", type = "decimal", erp = "value", crm = "amount"}}
currency = {{owner = "crm", erp = "currency", crm = "deal_currency_code"}}
legal_entity = {{owner = "crm", erp = "legal_entity", crm = "legal_entity"}}
tax_code = {{owner = "crm", erp = "tax_code", crm = "tax_code"}}
service_line = {{owner = "crm", crm = "service_line"}}
stage = {{owner = "crm", crm = "dealstage", values = {{crm = {{won = "closedwon", {stages}}}}}}}
version = {{owner = "erp", type = "int", erp = "version"}}
delivery_status = {{owner = "erp", erp = "delivery_status", crm = "delivery_status"}}

[entities.project.systems.erp]
object = "erp.projects"
key = "id"
match_on = "project_code"
updated_at = "updated_at"

[entities.project.fields]
project_code = {{owner = "erp", erp = "project_code"}}
contract = {{owner = "erp", ref = "contract", erp = "contract_id"}}
customer = {{owner = "erp", ref = "customer", erp = "customer_id"}}
service_line = {{owner = "erp", erp = "service_line"}}
status = {{owner = "erp", erp = "status"}}

[entities.legal_entity.systems.erp]
object = "erp.legal_entities"
key = "code"
match_on = "code"

[entities.legal_entity.fields]
code = {{owner = "erp", erp = "code"}}
currencies = {{owner = "erp", erp = "currency_codes"}}

[entities.tax_code.systems.erp]
object = "erp.tax_codes"
key = "code"
match_on = "code"

[entities.tax_code.fields]
code = {{owner = "erp", erp = "code"}}

[entities.service_line.systems.erp]
object = "erp.service_lines"
key = "code"
match_on = "code"

[entities.service_line.fields]
code = {{owner = "erp", erp = "code"}}

[workflows.closed_won]
project_code = "{{service_line}}-{{crm_id}}"
crm_project_field = "erp_project_id"
"""
    )
    return path


@pytest.fixture
def hubspot_won(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubSpotEnv]:
    """HubSpot with the deal properties closed-won reads, reference data journaled by a resync."""
    monkeypatch.setenv("HS_TOKEN", "pat-na1-emulator")
    load_erp(pg_dsn)
    hs = HubSpotEmulator(search_rate_per_s=1000, burst_limit=10_000)
    hs.define_property("companies", "customer_no")
    for name in ("legal_entity", "tax_code", "service_line", "delivery_status", "erp_project_id"):
        hs.define_property("deals", name)
    with EmulatorServer(hs) as server:
        env = HubSpotEnv(closed_won_config(tmp_path, pg_dsn, server.url), dsn=pg_dsn, hs=hs)
        env.clocks.append((hs, timedelta(seconds=6)))
        assert env.cli("init")[0] == 0
        code, out = env.cli("checkpoint", "rewind", "erp", "--to", "all", "--yes")
        assert code == 0 and "6 rows journaled" in out, out
        yield env
    drop_slot(pg_dsn)


@pytest.mark.pg
def test_closed_won_sets_up_customer_contract_and_project_when_a_hubspot_deal_is_won(
    hubspot_won: HubSpotEnv,
) -> None:
    """A won HubSpot deal becomes ERP customer, contract and project; ids flow back to HubSpot once."""
    env = hubspot_won
    company = env.hs.insert("companies", {"name": "Acme Consulting GmbH", "customer_no": "C-10042"})
    deal = env.hs.insert(
        "deals",
        {
            "dealname": "Acme - ERP rollout",
            "amount": "48000.00",
            "dealstage": "contractsent",
            "deal_currency_code": "EUR",
            "legal_entity": "ACME-DE",
            "tax_code": "DE-VAT19",
            "service_line": "IMPL",
        },
    )
    env.hs.associate("deals", deal, "companies", company)
    env.cycle()
    assert env.sql("SELECT count(*) FROM erp.contracts") == [(0,)], "an open deal reached the ERP"
    env.hs.update("deals", deal, {"dealstage": "closedwon"})
    env.cycle(2)
    code, out = env.cli("exceptions", "list", "--json")
    assert json.loads(out)["items"] == [], out
    assert env.sql("SELECT id, name, customer_no, crm_id FROM erp.customers") == [
        (1, "Acme Consulting GmbH", "C-10042", company)
    ]
    assert env.sql(
        "SELECT customer_id, title, value, currency, legal_entity, tax_code, delivery_status, crm_id"
        " FROM erp.contracts"
    ) == [(1, "Acme - ERP rollout", Decimal("48000.00"), "EUR", "ACME-DE", "DE-VAT19", "setup", deal)]
    assert env.sql("SELECT project_code, contract_id, customer_id, service_line FROM erp.projects") == [
        (f"IMPL-{deal}", 1, 1, "IMPL")
    ]
    props = env.props("deals", deal)
    assert (props["erp_id"], props["erp_project_id"], props["delivery_status"]) == ("1", "1", "setup")
    assert env.props("companies", company)["erp_id"] == "1"
    before = env.writes()
    env.cycle(2)
    assert env.writes() == before, "an echo was sent back to HubSpot"
    assert env.sql("SELECT count(*) FROM erp.projects") == [(1,)]

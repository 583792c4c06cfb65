"""The same sync engine over other vendor pairs, through ``syncagent run --once``.

(a) ERP PostgreSQL <-> CRM HubSpot (companies, deals), (b) ERP PostgreSQL <-> CRM Dynamics
365 (accounts), (c) ERP NetSuite (customer) <-> CRM Salesforce (Account). Every emulator
runs as a real loopback server; a change on either side reaches the other, and counting
each emulator's write requests shows that nothing is echoed back.
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
from tests.erp import dsn_parts, load_erp

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

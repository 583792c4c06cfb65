"""Test helpers: the demo ERP schema in a fresh database, and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import psycopg

from agent.demo import erp_schema_sql


def load_erp(dsn: str) -> None:
    """Create the demo ERP schema (erp.*) in the database at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(erp_schema_sql())


def dsn_parts(dsn: str) -> dict[str, str]:
    """Split a ``key=value`` DSN into its parts."""
    return dict(part.split("=", 1) for part in dsn.split())


def erp_only_config(tmp_path: Path, dsn: str, *, slot: str | None = None, extra: str = "") -> Path:
    """A config that captures erp.customers and erp.contracts into a state file under tmp_path.

    Slots are cluster-wide, so each test database gets a slot named after it.
    """
    p = dsn_parts(dsn)
    slot = slot or p["dbname"]
    path = tmp_path / "config.toml"
    path.write_text(f"""
[agent]
state_path = "{tmp_path / "state" / "state.db"}"

[systems.erp]
type = "postgres"
host = "{p["host"]}"
port = {p["port"]}
dbname = "{p["dbname"]}"
user = "{p["user"]}"
slot = "{slot}"
publication = "{slot}"
origin = "{slot}"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
updated_at = "updated_at"

[entities.customer.fields]
name = {{owner = "erp", erp = "name"}}
status = {{owner = "erp", erp = "status"}}

[entities.contract.systems.erp]
object = "erp.contracts"
key = "id"

[entities.contract.fields]
title = {{owner = "erp", erp = "title"}}
value = {{owner = "erp", type = "decimal", erp = "value"}}
{extra}
""")
    return path


def add_sf_fields(emulator: object) -> None:
    """Give the Salesforce emulator the custom fields the sync config maps."""
    from connectors.salesforce.schema import SfField

    schemas = emulator.schemas  # type: ignore[attr-defined]
    account = schemas["Account"].fields
    account["Status__c"] = SfField("Status__c", "picklist", picklist=("Active", "On Hold", "Inactive"))
    account["Credit_Limit__c"] = SfField("Credit_Limit__c", "currency")
    opp = schemas["Opportunity"].fields
    opp["Delivery_Status__c"] = SfField("Delivery_Status__c")


def sync_config(
    tmp_path: Path,
    dsn: str,
    sf_url: str,
    *,
    non_owner: str = "ignore",
    conflict: str = "latest",
    extra: str = "",
) -> Path:
    """ERP (PostgreSQL) <-> Salesforce (emulator) for customers and contracts."""
    p = dsn_parts(dsn)
    path = tmp_path / "sync.toml"
    path.write_text(f"""
[agent]
state_path = "{tmp_path / "state" / "state.db"}"
retry_base_seconds = 0.01
retry_cap_seconds = 0.05

[systems.erp]
type = "postgres"
host = "{p["host"]}"
port = {p["port"]}
dbname = "{p["dbname"]}"
user = "{p["user"]}"
slot = "{p["dbname"]}"
publication = "{p["dbname"]}"
origin = "{p["dbname"]}"

[systems.crm]
type = "salesforce"
instance_url = "{sf_url}"
client_id = {{env = "SF_CLIENT_ID"}}
client_secret = {{env = "SF_CLIENT_SECRET"}}
lookback_seconds = 5

[entities.customer]
on_non_owner_edit = "{non_owner}"
on_conflict = "{conflict}"

[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
match_on = "customer_no"
updated_at = "updated_at"

[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"
match_on = "customer_no"

[entities.customer.fields]
name = {{owner = "crm", erp = "name", crm = "Name"}}
customer_no = {{owner = "erp", erp = "customer_no", crm = "AccountNumber"}}
phone = {{owner = "shared", erp = "phone", crm = "Phone"}}
credit_limit = {{owner = "erp", type = "decimal", erp = "credit_limit", crm = "Credit_Limit__c"}}
status = {{owner = "erp", erp = "status", crm = "Status__c", values = {{crm = {{active = "Active", hold = "On Hold", archived = "Inactive"}}}}}}

[entities.contract.systems.erp]
object = "erp.contracts"
key = "id"
external_id = "crm_id"

[entities.contract.systems.crm]
object = "Opportunity"
key = "Id"
external_id = "ERP_Id__c"

[entities.contract.fields]
title = {{owner = "crm", erp = "title", crm = "Name"}}
customer = {{owner = "crm", ref = "customer", erp = "customer_id", crm = "AccountId"}}
value = {{owner = "crm", type = "decimal", erp = "value", crm = "Amount"}}
close_date = {{owner = "crm", type = "date", erp = "signed_on", crm = "CloseDate"}}
delivery_status = {{owner = "erp", erp = "delivery_status", crm = "Delivery_Status__c"}}
{extra}
""")
    return path

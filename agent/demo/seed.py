"""The demo's CRM and configuration: the Salesforce emulator's extra fields, its sample deals.

The emulator gets the custom fields the demo config maps on Account and Opportunity, and a
``Change_Order__c`` object, through its public ``schemas`` argument; the sample accounts
and opportunities reference the demo ERP's legal entities, tax codes and service lines
(one of them a tax code the ERP does not have yet). ``write_config`` fills the demo config
template (``demo_config.toml``) for a database and an emulator URL.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from importlib.resources import files
from pathlib import Path
from string import Template
from typing import Any

from connectors.salesforce.emulator import SalesforceEmulator, SfField, SfSchema, default_schemas

CLIENT_ID_ENV = "SYNCAGENT_DEMO_SF_CLIENT_ID"
CLIENT_SECRET_ENV = "SYNCAGENT_DEMO_SF_CLIENT_SECRET"
CLIENT_ID, CLIENT_SECRET = "syncagent", "s3cret"
REFERENCE_TABLES = ("erp.legal_entities", "erp.tax_codes", "erp.service_lines")

_OPPORTUNITY_FIELDS = (
    SfField("CurrencyIsoCode", "picklist", picklist=("EUR", "GBP", "USD", "CHF")),
    SfField("Billing_Type__c", "picklist", picklist=("Fixed Fee", "Time & Materials")),
    SfField("Legal_Entity__c", length=40),
    SfField("Tax_Code__c", length=40),
    SfField("Service_Line__c", length=40),
    SfField("Delivery_Status__c", length=40),
    SfField("ERP_Project_Id__c", length=40),
    SfField("Percent_Complete__c", "percent"),
    SfField("Delivery_Updated_At__c", "datetime"),
    SfField("Invoiced_Amount__c", "currency"),
    SfField("Last_Invoiced_At__c", "datetime"),
    SfField("Paid_Amount__c", "currency"),
    SfField("Last_Paid_At__c", "datetime"),
    SfField("Consumed_Hours__c", "double"),
    SfField("Consumed_Amount__c", "currency"),
    SfField("Last_Worked_On__c", "date"),
)
_SYSTEM_FIELDS = (
    SfField("Id", "id", updateable=False),
    SfField("IsDeleted", "boolean", updateable=False),
    SfField("CreatedDate", "datetime", updateable=False),
    SfField("LastModifiedDate", "datetime", updateable=False),
    SfField("SystemModstamp", "datetime", updateable=False),
)
_CHANGE_ORDER_FIELDS = (
    SfField("Name", required=True),
    SfField("Opportunity__c", "reference", required=True, length=18),
    SfField("New_Amount__c", "currency"),
    SfField("Billing_Schedule__c", length=2000),
    SfField("Status__c", "picklist", picklist=("Draft", "Submitted", "Approved", "Rejected")),
    SfField("Approved_By__c", length=80),
    SfField("Approved_At__c", "datetime"),
    SfField("ERP_Revision_Id__c", length=40),
)

ACCOUNTS = (
    ("Acme Consulting GmbH", "C-10042", "Berlin", "DE"),
    ("Northwind Advisory Ltd", "C-10043", "London", "GB"),
    ("Globex Engineering SA", "C-10044", "Lyon", "FR"),
)
# name, account number, stage, amount, currency, billing type, legal entity, tax code, service line
OPPORTUNITIES = (
    (
        "Acme - ERP rollout",
        "C-10042",
        "Negotiation",
        "48000.00",
        "EUR",
        "Fixed Fee",
        "ACME-DE",
        "DE-VAT19",
        "IMPL",
    ),
    (
        "Northwind - Advisory retainer",
        "C-10043",
        "Proposal",
        "12500.50",
        "GBP",
        "Time & Materials",
        "ACME-UK",
        "UK-VAT20",
        "ADVISORY",
    ),
    (
        "Globex - Data migration",
        "C-10044",
        "Negotiation",
        "30000.00",
        "EUR",
        "Fixed Fee",
        "ACME-DE",
        "DE-VAT7",
        "IMPL",
    ),
)


def crm_schemas() -> dict[str, SfSchema]:
    """The emulator's objects: the defaults, the demo's custom fields, and ``Change_Order__c``."""
    schemas = default_schemas()
    opportunity = schemas["Opportunity"].fields
    for f in _OPPORTUNITY_FIELDS:
        opportunity[f.name] = f
    schemas["Change_Order__c"] = SfSchema(
        "Change_Order__c", "a0C", {f.name: f for f in (*_SYSTEM_FIELDS, *_CHANGE_ORDER_FIELDS)}
    )
    return schemas


def make_crm(**kwargs: Any) -> SalesforceEmulator:
    """A fresh Salesforce emulator with the demo's objects (and the demo's client credentials)."""
    return SalesforceEmulator(schemas=crm_schemas(), clients={CLIENT_ID: CLIENT_SECRET}, **kwargs)


def seed_crm(sf: SalesforceEmulator) -> dict[str, str]:
    """Create the sample accounts and opportunities; return their record ids by name."""
    ids: dict[str, str] = {}
    for name, number, city, country in ACCOUNTS:
        ids[name] = sf.insert(
            "Account", {"Name": name, "AccountNumber": number, "BillingCity": city, "BillingCountry": country}
        )
    by_number = {number: ids[name] for name, number, _c, _k in ACCOUNTS}
    for name, number, stage, value, currency, billing, entity, tax, line in OPPORTUNITIES:
        ids[name] = sf.insert(
            "Opportunity",
            deal_fields(name, by_number[number], stage, value, currency, billing, entity, tax, line),
        )
    return ids


def deal_fields(
    name: str,
    account_id: str,
    stage: str,
    value: str,
    currency: str = "EUR",
    billing: str = "Fixed Fee",
    legal_entity: str | None = "ACME-DE",
    tax_code: str | None = "DE-VAT19",
    service_line: str | None = "IMPL",
) -> dict[str, Any]:
    """An opportunity's fields as the demo config maps them."""
    return {
        "Name": name,
        "AccountId": account_id,
        "StageName": stage,
        "Amount": Decimal(value),
        "CloseDate": datetime.now(UTC).date().isoformat(),
        "CurrencyIsoCode": currency,
        "Billing_Type__c": billing,
        "Legal_Entity__c": legal_entity,
        "Tax_Code__c": tax_code,
        "Service_Line__c": service_line,
    }


def write_config(
    path: Path,
    *,
    db: Mapping[str, str],
    sf_url: str,
    state_path: Path,
    slot: str,
    poll_interval: float = 1.0,
) -> Path:
    """Write the demo config for database ``db`` (host, port, dbname, user) and the emulator."""
    template = Template(files(__package__).joinpath("demo_config.toml").read_text())
    path.write_text(
        template.substitute(
            host=db["host"],
            port=db["port"],
            dbname=db["dbname"],
            user=db["user"],
            slot=slot,
            sf_url=sf_url,
            state_path=str(state_path),
            poll=poll_interval,
            client_id_env=CLIENT_ID_ENV,
            client_secret_env=CLIENT_SECRET_ENV,
        )
    )
    return path


def crm_env() -> dict[str, str]:
    """The environment variables the demo config reads the emulator's credentials from."""
    return {CLIENT_ID_ENV: CLIENT_ID, CLIENT_SECRET_ENV: CLIENT_SECRET}

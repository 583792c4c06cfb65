"""Billing, time actuals and change orders, end to end: real PostgreSQL, the Salesforce emulator, the CLI."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from tests.e2e import test_workflows as base

Env = base.Env
wf_env = base.wf_env  # the fixture: one ERP database, one emulator, one state file

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


def _won(env: Env) -> tuple[str, int]:
    """A won deal set up in the ERP: its CRM id and its ERP project id."""
    opp = env.deal(env.account())
    env.cycle()
    env.win(opp)
    [(project,)] = env.sql("SELECT id FROM erp.projects")
    return opp, project


def test_billing_shows_progress_invoicing_and_payments_in_the_crm_with_the_erp_times(wf_env: Env) -> None:
    env = wf_env
    opp, project = _won(env)
    env.sql(
        "INSERT INTO erp.milestones (project_id, name, amount) VALUES (%s, 'Design', 20000), (%s, 'Build', 28000)",
        project,
        project,
    )
    env.sql(
        "UPDATE erp.milestones SET status = 'completed', completed_at = '2026-01-15 10:00:00+00' WHERE name = 'Design'"
    )
    env.cycle(2)
    o = env.sf.get("Opportunity", opp) or {}
    assert Decimal(str(o["Percent_Complete__c"])) == Decimal("41.67")
    assert o["Delivery_Status__c"] == "in_progress"
    assert o["Delivery_Updated_At__c"] == "2026-01-15T10:00:00Z"
    assert Decimal(str(o["Invoiced_Amount__c"])) == 0
    env.sql(
        "INSERT INTO erp.invoices (invoice_no, contract_id, amount, status, posted_at) VALUES"
        " ('INV-1', 1, 20000, 'posted', '2026-01-20 09:00:00+00'), ('INV-2', 1, 9999, 'draft', NULL)"
    )
    env.sql(
        "INSERT INTO erp.payments (invoice_id, amount, received_at) VALUES (1, 5000, '2026-02-01 12:00:00+00')"
    )
    env.cycle(2)
    o = env.sf.get("Opportunity", opp) or {}
    assert Decimal(str(o["Invoiced_Amount__c"])) == 20000, "a draft invoice was counted"
    assert o["Last_Invoiced_At__c"] == "2026-01-20T09:00:00Z"
    assert Decimal(str(o["Paid_Amount__c"])) == 5000 and o["Last_Paid_At__c"] == "2026-02-01T12:00:00Z"
    env.sql("UPDATE erp.milestones SET status = 'completed', completed_at = '2026-03-01 08:00:00+00'")
    env.cycle(2)
    o = env.sf.get("Opportunity", opp) or {}
    assert Decimal(str(o["Percent_Complete__c"])) == 100 and o["Delivery_Status__c"] == "delivered"
    billing = env.instances("billing")
    assert billing and {i.status for i in billing} == {"completed"}
    assert env.open_items() == []


def test_billing_writes_nothing_again_when_the_journal_is_replayed(wf_env: Env) -> None:
    env = wf_env
    opp, project = _won(env)
    env.sql(
        "INSERT INTO erp.milestones (project_id, name, amount, status) VALUES (%s, 'All', 1, 'completed')",
        project,
    )
    env.sql(
        "INSERT INTO erp.invoices (invoice_no, contract_id, amount, status) VALUES ('INV-1', 1, 48000, 'posted')"
    )
    env.cycle(2)
    writes, instances = env.crm_writes(), len(env.instances())
    assert env.cli("checkpoint", "rewind", "resolver", "--seq", "0", "--yes")[0] == 0
    assert env.cli("checkpoint", "rewind", "erp", "--to", "all", "--yes")[0] == 0
    env.cycle(2)
    assert env.crm_writes() == writes, "a replay wrote the CRM again"
    assert len(env.instances()) == instances
    assert Decimal(str((env.sf.get("Opportunity", opp) or {})["Invoiced_Amount__c"])) == 48000


def test_time_actuals_moves_only_approved_hours_to_the_crm(wf_env: Env) -> None:
    env = wf_env
    opp, project = _won(env)
    writes = env.crm_writes()
    env.sql(
        "INSERT INTO erp.time_entries (project_id, person, hours, rate, worked_on) VALUES"
        " (%s, 'ana', 8, 150, '2026-01-05'), (%s, 'ben', 6.5, 120, '2026-01-06')",
        project,
        project,
    )
    env.sql("UPDATE erp.time_entries SET hours = 7 WHERE person = 'ben'")
    env.cycle(2)
    assert env.crm_writes() == writes, "unapproved time moved"
    assert (env.sf.get("Opportunity", opp) or {})["Consumed_Hours__c"] is None
    env.sql("UPDATE erp.time_entries SET approved = true WHERE person = 'ana'")
    env.cycle(2)
    o = env.sf.get("Opportunity", opp) or {}
    assert (Decimal(str(o["Consumed_Hours__c"])), Decimal(str(o["Consumed_Amount__c"]))) == (8, 1200)
    assert o["Last_Worked_On__c"] == "2026-01-05"
    env.sql("UPDATE erp.time_entries SET approved = true WHERE person = 'ben'")
    env.sql("UPDATE erp.time_entries SET approved = false WHERE person = 'ana'")
    env.cycle(2)
    o = env.sf.get("Opportunity", opp) or {}
    assert (Decimal(str(o["Consumed_Hours__c"])), Decimal(str(o["Consumed_Amount__c"]))) == (7, 840)


def _change_order(env: Env, opp: str, amount: str, status: str = "Approved", name: str = "CO-1") -> str:
    schedule = json.dumps([{"due": "2026-06-30", "amount": amount}])
    return env.sf.insert(
        "Change_Order__c",
        {
            "Name": name,
            "Opportunity__c": opp,
            "New_Amount__c": Decimal(amount),
            "Billing_Schedule__c": schedule,
            "Status__c": status,
            "Approved_By__c": "Dana Lee" if status == "Approved" else None,
            "Approved_At__c": "2026-02-10T15:30:00Z" if status == "Approved" else None,
        },
    )


def test_change_order_revises_the_contract_and_keeps_its_history_when_approved(wf_env: Env) -> None:
    env = wf_env
    opp, _project = _won(env)
    draft = _change_order(env, opp, "99999.00", status="Draft", name="CO-0")
    env.cycle(2)
    assert env.sql("SELECT value, version FROM erp.contracts") == [(48000, 1)], "a draft revised the contract"
    co = _change_order(env, opp, "55000.00")
    env.cycle(3)
    [rev] = env.sql(
        "SELECT contract_id, version, old_value, new_value, billing_schedule, approved_by, approved_at,"
        " trace_id, change_order_ref FROM erp.contract_revisions"
    )
    assert rev[:4] == (1, 2, 48000, 55000) and rev[4] == [{"due": "2026-06-30", "amount": "55000.00"}]
    assert rev[5] == "Dana Lee" and rev[6].isoformat() == "2026-02-10T15:30:00+00:00" and rev[8] == co
    trace = [
        e["trace_id"] for e in env.json("journal", "--limit", "1000")["entries"] if e["key"] == {"Id": co}
    ]
    assert rev[7] == trace[0], "the revision does not carry the change order's trace id"
    assert env.sql("SELECT value, version FROM erp.contracts") == [(55000, 2)]
    assert Decimal(str((env.sf.get("Opportunity", opp) or {})["Amount"])) == 55000
    assert (env.sf.get("Change_Order__c", co) or {})["ERP_Revision_Id__c"] == "1"
    assert (env.sf.get("Change_Order__c", draft) or {})["ERP_Revision_Id__c"] is None
    _change_order(env, opp, "61000.00", name="CO-2")
    env.cycle(3)
    assert env.sql("SELECT version, old_value, new_value FROM erp.contract_revisions ORDER BY version") == [
        (2, 48000, 55000),
        (3, 55000, 61000),
    ]
    assert env.sql("SELECT value, version FROM erp.contracts") == [(61000, 3)]
    # Replays of both change orders: nothing is revised twice.
    assert env.cli("checkpoint", "rewind", "resolver", "--seq", "0", "--yes")[0] == 0
    assert env.cli("checkpoint", "rewind", "crm", "--to", "1h", "--yes")[0] == 0
    env.cycle(3)
    assert env.sql("SELECT count(*) FROM erp.contract_revisions") == [(2,)]
    assert env.sql("SELECT value, version FROM erp.contracts") == [(61000, 3)]
    assert env.open_items() == []


def test_change_order_waits_for_the_contract_and_goes_through_once_the_deal_is_set_up(wf_env: Env) -> None:
    env = wf_env
    opp = env.deal(env.account())
    env.cycle()
    _change_order(env, opp, "50000.00")
    env.cycle(2)
    [item] = env.open_items()
    assert (item.kind, item.reason) == ("dependency", "contract_not_in_erp")
    assert env.counts() == (0, 0, 0, 0)
    env.win(opp, cycles=3)
    assert env.sql("SELECT version, old_value, new_value FROM erp.contract_revisions") == [(2, 48000, 50000)]
    assert env.sql("SELECT value, version FROM erp.contracts") == [(50000, 2)]
    assert env.open_items() == []
    assert {(i.workflow, i.status) for i in env.instances()} >= {
        ("closed_won", "completed"),
        ("change_order", "completed"),
    }

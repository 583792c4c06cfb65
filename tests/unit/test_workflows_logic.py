"""Workflows without I/O: config validation, the closed-won decision, the unit op's step logic."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.demo.seed import write_config
from agent.errors import ConfigError
from agent.model import Change, JournalEntry, Op, Outcome, utcnow
from agent.resolve import Resolver, SeenValue
from agent.workflows import WORKFLOW_OPTIONS, build_workflows
from connectors.postgres.units import apply_unit

ROOT = Path(__file__).resolve().parents[2]
DB = {"host": "127.0.0.1", "port": "5432", "dbname": "erp", "user": "me"}
ENV = {"SYNCAGENT_DEMO_SF_CLIENT_ID": "id", "SYNCAGENT_DEMO_SF_CLIENT_SECRET": "secret"}


def demo_config(tmp_path: Path, extra: str = "", replace: tuple[str, str] | None = None) -> Path:
    path = write_config(
        tmp_path / "demo.toml", db=DB, sf_url="http://127.0.0.1:1", state_path=tmp_path / "s.db", slot="s"
    )
    text = path.read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    path.write_text(text + extra)
    return path


class View:
    """An in-memory StateView: xref, shadow and natural keys as plain dicts."""

    def __init__(self) -> None:
        self.xref: dict[tuple[str, str, str], str] = {}  # (entity, system, external id) -> cid
        self.shadows: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.naturals: dict[tuple[str, str, Any], str] = {}
        self.statuses: dict[str, str] = {}

    def link(self, entity: str, cid: str, system: str, external_id: str) -> None:
        self.xref[(entity, system, external_id)] = cid

    def canonical_id(self, entity: str, system: str, external_id: str) -> str | None:
        return self.xref.get((entity, system, external_id))

    def external_id(self, entity: str, canonical_id: str, system: str) -> str | None:
        return next(
            (x for (e, s, x), c in self.xref.items() if (e, s, c) == (entity, system, canonical_id)), None
        )

    def shadow(self, entity: str, canonical_id: str, system: str) -> Mapping[str, SeenValue]:
        return {
            k: SeenValue(v, None) for k, v in self.shadows.get((entity, canonical_id, system), {}).items()
        }

    def find_natural(self, entity: str, field: str, value: Any) -> str | None:
        return self.naturals.get((entity, field, value))

    def new_canonical_id(self) -> str:
        return f"cid{len(self.xref)}"

    def pending_fields(self, entity: str, canonical_id: str, system: str) -> frozenset[str]:
        return frozenset()

    def pending_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Any]:
        return {}

    def late_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, list[Any]]:
        return {}

    def queued_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, list[Any]]:
        return {}

    def related(
        self, entity: str, system: str, field: str, value: Any
    ) -> Mapping[str, Mapping[str, SeenValue]]:
        return {}

    def workflow_status(self, instance_key: str) -> str | None:
        return self.statuses.get(instance_key)


def _reference_data(view: View) -> None:
    view.naturals[("legal_entity", "code", "ACME-DE")] = "le1"
    view.shadows[("legal_entity", "le1", "erp")] = {"code": "ACME-DE", "currencies": "['EUR']"}
    view.naturals[("tax_code", "code", "DE-VAT19")] = "tc1"
    view.naturals[("service_line", "code", "IMPL")] = "sl1"
    view.link("customer", "cust1", "crm", "001A")
    view.shadows[("customer", "cust1", "crm")] = {"name": "Acme", "customer_no": "C-1"}


def _won_change(**fields: Any) -> JournalEntry:
    base = {
        "Name": "Acme - rollout",
        "AccountId": "001A",
        "StageName": "Closed Won",
        "Amount": "48000.00",
        "CurrencyIsoCode": "EUR",
        "Billing_Type__c": "Fixed Fee",
        "Legal_Entity__c": "ACME-DE",
        "Tax_Code__c": "DE-VAT19",
        "Service_Line__c": "IMPL",
        "CloseDate": "2026-01-31",
    }
    change = Change(
        source="crm",
        stream="Opportunity",
        object_name="Opportunity",
        op="update",
        key={"Id": "006A"},
        fields={**base, **fields},
        position="006A@1",
        version="1",
        source_ts=utcnow(),
    )
    return JournalEntry(7, change, utcnow())


@pytest.fixture
def resolver(tmp_path: Path) -> Resolver:
    cfg = load_config(demo_config(tmp_path), environ=ENV)
    return Resolver(cfg, own_origins=frozenset({"s"}), workflows=build_workflows(cfg))


def test_build_workflows_makes_every_enabled_workflow_when_the_demo_config_loads(tmp_path: Path) -> None:
    cfg = load_config(demo_config(tmp_path), environ=ENV)
    assert build_workflows(cfg).names() == ["closed_won", "change_order", "billing", "time_actuals"]
    assert cfg.workflows["closed_won"]["trigger_value"] == "won"  # defaults filled in
    off = load_config(
        demo_config(tmp_path, replace=("[workflows.billing]\n", "[workflows.billing]\nenabled = false\n")),
        environ=ENV,
    )
    assert "billing" not in build_workflows(off).names()


@pytest.mark.parametrize(
    "extra,replace,key",
    [
        ("\n[workflows.upsell]\nenabled = true\n", None, "workflows.upsell"),
        (
            "",
            ("[workflows.closed_won]\n", "[workflows.closed_won]\ncolour = 'red'\n"),
            "workflows.closed_won.colour",
        ),
        (
            "",
            ("[workflows.closed_won]\n", "[workflows.closed_won]\ndeals = 'deal'\n"),
            "workflows.closed_won.deals",
        ),
        (
            "",
            ("[workflows.closed_won]\n", "[workflows.closed_won]\ncrm = 'hubspot'\n"),
            "workflows.closed_won.crm",
        ),
        (
            "",
            ('tax_code = {owner = "crm", erp = "tax_code", crm = "Tax_Code__c"}\n', ""),
            "workflows.closed_won.deals",
        ),
        (
            "",
            ('project_code = "{service_line}-{crm_id}"', 'project_code = "{region}-{crm_id}"'),
            "workflows.closed_won.project_code",
        ),
        (
            "",
            ("[workflows.closed_won]\n", "[workflows.closed_won]\ncustomer_creation = 'never'\n"),
            "workflows.closed_won.customer_creation",
        ),
        (
            "",
            ("[workflows.closed_won]\n", "[workflows.closed_won]\nenabled = 'yes'\n"),
            "workflows.closed_won.enabled",
        ),
        (
            "",
            ('match_on = "code"\n\n[entities.tax_code.fields]', "\n[entities.tax_code.fields]"),
            "workflows.closed_won.tax_codes",
        ),
        (
            "",
            ('consumed_hours = "Consumed_Hours__c", ', 'overtime = "Overtime__c", '),
            "workflows.time_actuals.crm_fields.overtime",
        ),
        (
            "",
            ("crm_fields = {delivery_status", "crm_fields = {}\nold_fields = {delivery_status"),
            "workflows.billing.crm_fields",
        ),
        (
            "",
            ("[workflows.change_order]\n", "[workflows.change_order]\nrevisions = 'project'\n"),
            "workflows.change_order.revisions",
        ),
    ],
)
def test_load_config_names_the_workflow_key_when_a_workflow_table_is_wrong(
    tmp_path: Path, extra: str, replace: tuple[str, str] | None, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(demo_config(tmp_path, extra, replace), environ=ENV)
    assert key in {e.key for e in info.value.errors}, [str(e) for e in info.value.errors]
    assert all(e.file == str(tmp_path / "demo.toml") for e in info.value.errors)


def test_config_example_mentions_every_workflow_key_and_loads_them(tmp_path: Path) -> None:
    text = (ROOT / "config.example.toml").read_text()
    keys = {k for spec in WORKFLOW_OPTIONS.values() for k in spec}
    missing = sorted(k for k in keys if not re.search(rf"(^|[\s{{,#]){re.escape(k)}\s*=", text, re.M))
    assert missing == []
    for name in WORKFLOW_OPTIONS:
        assert f"[workflows.{name}]" in text
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("erp_password", "sf_client_secret", "sf_jwt_key"):
        (creds / name).write_text("x")
    cfg = load_config(
        ROOT / "config.example.toml", environ={"SF_CLIENT_ID": "cid", "CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert sorted(build_workflows(cfg).names()) == sorted(WORKFLOW_OPTIONS)


def test_closed_won_queues_one_unit_op_with_customer_contract_and_project_when_a_deal_is_won(
    resolver: Resolver,
) -> None:
    view = View()
    _reference_data(view)
    d = resolver.resolve(_won_change(), view)
    assert d.fate == "queued" and d.problems == ()
    [unit] = [op for op in d.ops if op.action == "unit"]
    assert (unit.target, unit.idempotency_key, unit.workflow) == (
        "erp",
        f"wf:closed_won:{d.canonical_id}",
        f"closed_won:{d.canonical_id}",
    )
    steps = unit.fields["steps"]
    assert [s["object"] for s in steps] == ["erp.customers", "erp.contracts", "erp.projects"]
    assert steps[0]["key"] == {"crm_id": "001A"} and steps[0]["fields"] == {
        "name": "Acme",
        "customer_no": "C-1",
    }
    assert steps[1]["key"] == {"crm_id": "006A"} and steps[1]["fields"]["customer_id"] == {"$step": 0}
    assert steps[1]["fields"]["currency"] == "EUR" and steps[1]["fields"]["version"] == 1
    assert steps[2]["key"] == {"project_code": "IMPL-006A"}
    assert steps[2]["fields"]["contract_id"] == {"$step": 1} and steps[2]["fields"]["customer_id"] == {
        "$step": 0
    }
    assert [i.status for i in d.instances] == ["running"]
    assert not [op for op in d.ops if op.target == "erp" and op.action == "upsert"], (
        "the generic sync created too"
    )


def test_closed_won_parks_with_every_missing_reference_named_when_the_erp_lacks_them(
    resolver: Resolver,
) -> None:
    view = View()
    view.link("customer", "cust1", "crm", "001A")
    d = resolver.resolve(_won_change(Service_Line__c="CLOUD"), view)
    assert d.fate == "exception" and not d.ops
    assert {(p.kind, p.reason, p.blocking_ref) for p in d.problems} == {
        ("validation", "missing_legal_entity", "legal_entity:ACME-DE"),
        ("validation", "missing_tax_code", "tax_code:DE-VAT19"),
        ("validation", "missing_service_line", "service_line:CLOUD"),
    }
    assert all(p.instance_key == f"closed_won:{d.canonical_id}" for p in d.problems)
    assert [i.status for i in d.instances] == ["parked"]


def test_closed_won_parks_when_the_currency_is_not_one_the_legal_entity_allows(resolver: Resolver) -> None:
    view = View()
    _reference_data(view)
    d = resolver.resolve(_won_change(CurrencyIsoCode="USD"), view)
    [p] = d.problems
    assert (p.reason, p.blocking_ref) == ("currency_not_allowed", "legal_entity:ACME-DE")
    assert "USD" in p.detail and "EUR" in p.detail


@pytest.mark.parametrize("case", ["open_deal", "already_in_erp", "already_queued"])
def test_closed_won_is_not_triggered_when_the_deal_is_open_set_up_or_queued(
    resolver: Resolver, case: str
) -> None:
    view = View()
    _reference_data(view)
    view.link("contract", "deal1", "crm", "006A")
    if case == "already_in_erp":
        view.link("contract", "deal1", "erp", "17")
    if case == "already_queued":
        view.statuses["closed_won:deal1"] = "running"
    entry = _won_change(StageName="Negotiation") if case == "open_deal" else _won_change()
    d = resolver.resolve(entry, view)
    assert d.instances == () and not [op for op in d.ops if op.action == "unit"]


def _step_sink(refuse: dict[int, Outcome]) -> tuple[list[Op], Any]:
    seen: list[Op] = []

    def apply(step: Op) -> Outcome | Any:
        seen.append(step)
        if len(seen) - 1 in refuse:
            return refuse[len(seen) - 1]

        class Written:
            external_id = str(100 + len(seen))
            wrote = True

        return Written()

    return seen, apply


def _unit(*steps: dict[str, Any]) -> Op:
    return Op("k", "erp", "contract", "c1", "erp.contracts", "unit", {}, {"steps": list(steps)}, "t" * 16)


def test_apply_unit_passes_earlier_step_ids_into_later_steps_when_they_refer_to_them() -> None:
    seen, apply = _step_sink({})
    unit = _unit(
        {"object": "erp.customers", "key": {"crm_id": "001"}, "fields": {"name": "A"}},
        {"object": "erp.contracts", "key": {"crm_id": "006"}, "fields": {"customer_id": {"$step": 0}}},
    )
    assert apply_unit(unit, apply, contextlib.nullcontext) == (["101", "102"], True)
    assert [s.action for s in seen] == ["upsert", "upsert"]
    assert seen[1].fields == {"customer_id": "101"} and seen[1].object_name == "erp.contracts"


def test_apply_unit_answers_with_the_failing_step_named_when_a_step_is_refused() -> None:
    seen, apply = _step_sink({1: Outcome.reject("check_violation", "amount must be positive", "value")})
    unit = _unit(
        {"object": "erp.customers", "key": {"id": 1}, "fields": {}},
        {"object": "erp.contracts", "key": {"id": 2}, "fields": {"value": -1}},
        {"object": "erp.projects", "key": {"id": 3}, "fields": {}},
    )
    out = apply_unit(unit, apply, contextlib.nullcontext)
    assert isinstance(out, Outcome) and out.status == "reject" and out.field_name == "value"
    assert out.detail == "step 1 (erp.contracts): amount must be positive" and len(seen) == 2


@pytest.mark.parametrize(
    "steps,reason",
    [
        ([], "invalid_unit"),
        ([{"object": "erp.customers", "key": {"id": {"$step": 0}}, "fields": {}}], "bad_step_reference"),
        ([{"object": "erp.customers", "key": [1], "fields": {}}], "invalid_unit"),
    ],
)
def test_apply_unit_rejects_the_unit_when_its_steps_are_malformed(steps: list[Any], reason: str) -> None:
    _seen, apply = _step_sink({})
    out = apply_unit(_unit(*steps), apply, contextlib.nullcontext)
    assert isinstance(out, Outcome) and out.reason == reason

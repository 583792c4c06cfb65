"""The resolver as a pure function over an in-memory state view."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import Config, load_config
from agent.model import Change, JournalEntry
from agent.resolve import Resolver, SeenValue

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

CONFIG = """
[agent]
state_path = "/tmp/unused.db"
[systems.erp]
type = "postgres"
dbname = "erp"
user = "u"
[systems.crm]
type = "salesforce"
instance_url = "https://example.invalid"
client_id = {env = "X"}
client_secret = {env = "X"}
[entities.customer]
on_non_owner_edit = "POLICY"
on_conflict = "CONFLICT"
[entities.customer.systems.erp]
object = "erp.customers"
key = "id"
external_id = "crm_id"
match_on = "customer_no"
[entities.customer.systems.crm]
object = "Account"
key = "Id"
external_id = "ERP_Id__c"
match_on = "customer_no"
[entities.customer.fields]
name = {owner = "crm", erp = "name", crm = "Name"}
customer_no = {owner = "erp", erp = "customer_no", crm = "AccountNumber"}
phone = {owner = "shared", erp = "phone", crm = "Phone"}
limit = {owner = "erp", type = "decimal", erp = "credit_limit", crm = "Credit_Limit__c"}
status = {owner = "erp", erp = "status", crm = "Status__c", values = {crm = {active = "Active", hold = "On Hold"}}}
"""


def config(tmp_path: Path, policy: str = "ignore", conflict: str = "latest") -> Config:
    p = tmp_path / "c.toml"
    p.write_text(CONFIG.replace("POLICY", policy).replace("CONFLICT", conflict))
    return load_config(p, environ={"X": "x"})


class View:
    """An in-memory StateView: xref, shadow per system, natural keys."""

    def __init__(self) -> None:
        self.xref: dict[tuple[str, str, str], str] = {}
        self.shadows: dict[tuple[str, str, str], dict[str, SeenValue]] = {}
        self.natural: dict[tuple[str, str, Any], str] = {}
        self.pending: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.late: dict[tuple[str, str, str], dict[str, list[Any]]] = {}
        self._ids = (f"cid{n}" for n in itertools.count(1))

    def link(self, cid: str, system: str, ext: str) -> None:
        self.xref[("customer", system, ext)] = cid

    def canonical_id(self, entity: str, system: str, external_id: str) -> str | None:
        return self.xref.get((entity, system, external_id))

    def external_id(self, entity: str, canonical_id: str, system: str) -> str | None:
        return next(
            (e for (en, s, e), c in self.xref.items() if en == entity and s == system and c == canonical_id),
            None,
        )

    def shadow(self, entity: str, canonical_id: str, system: str) -> dict[str, SeenValue]:
        return self.shadows.get((entity, canonical_id, system), {})

    def find_natural(self, entity: str, field: str, value: Any) -> str | None:
        return self.natural.get((entity, field, value))

    def new_canonical_id(self) -> str:
        return next(self._ids)

    def pending_fields(self, entity: str, canonical_id: str, system: str) -> frozenset[str]:
        return frozenset(self.pending.get((entity, canonical_id, system), {}))

    def pending_values(self, entity: str, canonical_id: str, system: str) -> dict[str, Any]:
        return self.pending.get((entity, canonical_id, system), {})

    def late_values(self, entity: str, canonical_id: str, system: str) -> dict[str, list[Any]]:
        return self.late.get((entity, canonical_id, system), {})

    def queued_values(self, entity: str, canonical_id: str, system: str) -> dict[str, list[Any]]:
        return {k: [v] for k, v in self.pending.get((entity, canonical_id, system), {}).items()}

    def seen(self, cid: str, system: str, ts: datetime | None = None, **values: Any) -> None:
        self.shadows.setdefault(("customer", cid, system), {}).update(
            {k: SeenValue(v, ts) for k, v in values.items()}
        )


def change(
    source: str,
    key: dict,
    fields: dict,
    *,
    op: str = "update",
    ts: datetime = T0,
    origin: str | None = None,
    pos: str = "p1",
) -> JournalEntry:
    obj = "erp.customers" if source == "erp" else "Account"
    c = Change(
        source=source,
        stream="s",
        object_name=obj,
        op=op,
        key=key,
        fields=fields,  # type: ignore[arg-type]
        position=pos,
        version="v",
        source_ts=ts,
        origin=origin,
    )
    return JournalEntry(seq=1, change=c, captured_at=ts)


def linked(view: View) -> None:
    view.link("cid0", "erp", "5")
    view.link("cid0", "crm", "001A")
    both = {"name": "Acme", "customer_no": "C-5", "phone": "111", "limit": "100", "status": "active"}
    view.seen("cid0", "erp", T0 - timedelta(hours=1), **both)
    view.seen("cid0", "crm", T0 - timedelta(hours=1), **both)


def test_resolve_drops_a_change_tagged_with_our_origin_as_echo(tmp_path: Path) -> None:
    r = Resolver(config(tmp_path), own_origins=frozenset({"syncagent"}))
    d = r.resolve(change("erp", {"id": 5}, {"name": "x"}, origin="syncagent"), View())
    assert d.fate == "echo" and d.ops == ()


def test_resolve_creates_in_the_other_system_keyed_by_external_id_when_unlinked(tmp_path: Path) -> None:
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(
        change(
            "erp",
            {"id": 5},
            {"id": 5, "name": "Acme", "customer_no": "C-5", "status": "hold", "credit_limit": "100.50"},
            op="insert",
        ),
        View(),
    )
    assert d.fate == "queued" and len(d.ops) == 1
    op = d.ops[0]
    assert op.target == "crm" and op.key == {"ERP_Id__c": "5"}
    assert op.fields["Name"] == "Acme" and op.fields["Status__c"] == "On Hold"
    assert str(op.fields["Credit_Limit__c"]) == "100.5"
    assert d.link == ("erp", "5") and d.natural == (("customer_no", "C-5"),)


def test_resolve_links_by_natural_key_instead_of_creating_a_duplicate(tmp_path: Path) -> None:
    view = View()
    view.natural[("customer", "customer_no", "C-5")] = "cidX"
    view.link("cidX", "crm", "001A")
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"customer_no": "C-5", "name": "Acme"}, op="insert"), view)
    assert d.canonical_id == "cidX"
    assert d.ops and d.ops[0].key == {"Id": "001A"}


def test_resolve_is_a_noop_when_values_equal_the_shadow_so_api_echoes_stop(tmp_path: Path) -> None:
    view = View()
    linked(view)
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(
        change("crm", {"Id": "001A"}, {"Name": "Acme", "Phone": "111", "Status__c": "Active"}), view
    )
    assert d.fate == "noop" and d.ops == ()


@pytest.mark.parametrize(
    "policy,fate,ops_to",
    [("ignore", "ignored", []), ("revert", "queued", ["crm"]), ("exception", "exception", [])],
)
def test_resolve_applies_the_non_owner_policy_when_crm_edits_an_erp_owned_field(
    tmp_path: Path, policy: str, fate: str, ops_to: list[str]
) -> None:
    view = View()
    linked(view)
    r = Resolver(config(tmp_path, policy=policy), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Status__c": "On Hold"}), view)
    assert d.fate == fate and [o.target for o in d.ops] == ops_to
    assert d.audits and d.audits[0].detail["field"] == "status"
    assert d.audits[0].detail["new_value"] == "hold" and d.audits[0].detail["other_value"] == "active"
    if policy == "revert":
        assert d.ops[0].fields == {"Status__c": "Active"} and d.ops[0].key == {"Id": "001A"}
    if policy == "exception":
        assert d.problems[0].reason == "non_owner_edit" and d.problems[0].field == "status"


def test_resolve_propagates_an_owned_field_from_its_owner(tmp_path: Path) -> None:
    view = View()
    linked(view)
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Name": "Acme Intl"}), view)
    assert d.fate == "queued" and d.ops[0].target == "erp"
    assert d.ops[0].key == {"id": "5"} and d.ops[0].fields == {"name": "Acme Intl", "crm_id": "001A"}


@pytest.mark.parametrize(
    "conflict,erp_ts,winner",
    [
        ("latest", T0 - timedelta(minutes=1), "crm"),
        ("latest", T0 + timedelta(minutes=1), "erp"),
        ("erp", T0 - timedelta(minutes=1), "erp"),
        ("crm", T0 + timedelta(minutes=1), "crm"),
    ],
)
def test_resolve_settles_a_shared_field_conflict_by_policy_and_audits_both_values(
    tmp_path: Path, conflict: str, erp_ts: datetime, winner: str
) -> None:
    view = View()
    linked(view)
    view.seen("cid0", "erp", erp_ts, phone="222")  # the ERP changed phone since the last sync
    r = Resolver(config(tmp_path, conflict=conflict), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "333"}, ts=T0), view)
    audit = next(a for a in d.audits if a.action == "conflict_resolved")
    assert audit.detail["winner"] == winner
    assert {audit.detail["new_value"], audit.detail["other_value"]} == {"222", "333"}
    if winner == "crm":
        assert any(o.target == "erp" and o.fields.get("phone") == "333" for o in d.ops)
    else:
        assert any(o.target == "crm" and o.fields.get("Phone") == "222" for o in d.ops)


def test_resolve_parks_an_unknown_picklist_value_naming_the_field(tmp_path: Path) -> None:
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001B"}, {"Name": "X", "Status__c": "Prospect"}), View())
    assert d.fate == "exception" and d.problems[0].field == "status"


def test_resolve_parks_a_delete_for_review_by_default(tmp_path: Path) -> None:
    view = View()
    linked(view)
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {}, op="delete"), view)
    assert d.fate == "exception" and d.problems[0].reason == "deleted_in_source" and d.ops == ()


def test_resolve_sends_a_value_the_target_holds_when_a_queued_op_will_overwrite_it(tmp_path: Path) -> None:
    """ERP: active -> archived (op queued to the CRM) -> active: the CRM must end active again."""
    view = View()
    linked(view)
    view.seen("cid0", "erp", T0 - timedelta(seconds=1), status="archived")
    view.pending[("customer", "cid0", "crm")] = {"status": "archived"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "status": "active"}), view)
    assert [o.target for o in d.ops] == ["crm"] and d.ops[0].fields.get("Status__c") == "Active"


def test_resolve_skips_a_value_an_op_already_queued_for_the_target_will_write(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.pending[("customer", "cid0", "crm")] = {"status": "hold"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "status": "hold"}), view)
    assert d.ops == ()


def test_resolve_treats_columns_older_than_the_agents_later_write_as_history_when_a_row_image_arrives_late(
    tmp_path: Path,
) -> None:
    """An ERP edit of the limit committed before the agent wrote phone: its old phone is not an edit."""
    view = View()
    linked(view)
    view.seen(
        "cid0", "erp", T0 + timedelta(milliseconds=80), phone="570"
    )  # the agent's write, stamped after it
    view.seen("cid0", "crm", T0 + timedelta(milliseconds=50), phone="570")
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "phone": "524", "credit_limit": "592.5"}, ts=T0), view)
    assert [o.target for o in d.ops] == ["crm"]
    assert d.ops[0].fields.get("Credit_Limit__c") is not None and "Phone" not in d.ops[0].fields
    assert "phone" not in d.seen and d.seen["limit"] is not None


def test_resolve_propagates_a_row_edit_committed_after_the_agents_write(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.seen("cid0", "erp", T0 - timedelta(milliseconds=1), phone="570")
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "phone": "524"}, ts=T0), view)
    assert [o.fields.get("Phone") for o in d.ops] == ["524"]


def test_resolve_takes_a_value_an_unanswered_op_wrote_to_the_source_as_its_echo(tmp_path: Path) -> None:
    """The CRM shows the phone the agent sent but never heard back about: no change to pass on."""
    view = View()
    linked(view)
    view.pending[("customer", "cid0", "crm")] = {"phone": "222"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "222"}), view)
    assert d.ops == () and d.fate == "noop"


def test_resolve_passes_on_a_source_edit_that_differs_from_the_op_queued_for_it(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.pending[("customer", "cid0", "crm")] = {"phone": "222"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "333"}, ts=T0 + timedelta(hours=2)), view)
    assert any(o.target == "erp" and o.fields.get("phone") == "333" for o in d.ops)


def test_resolve_reverts_a_non_owner_edit_made_while_the_first_copy_is_still_queued(tmp_path: Path) -> None:
    """The ERP renames a CRM-owned field before its first copy reached the CRM: revert it to the copy's value."""
    view = View()
    view.link("cid0", "erp", "5")
    view.seen("cid0", "erp", T0 - timedelta(seconds=5), name="Acme", customer_no="C-5", status="active")
    view.pending[("customer", "cid0", "crm")] = {"name": "Acme", "customer_no": "C-5", "status": "active"}
    r = Resolver(config(tmp_path, policy="revert"), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "name": "Acme (typo)", "status": "hold"}), view)
    by_target = {o.target: o for o in d.ops}
    assert by_target["erp"].fields == {"name": "Acme"} and by_target["erp"].key == {"id": "5"}
    assert (
        by_target["crm"].key == {"ERP_Id__c": "5"} and by_target["crm"].fields.get("Status__c") == "On Hold"
    )
    assert "Name" not in by_target["crm"].fields
    assert any(a.action == "ownership_reverted" and a.detail["field"] == "name" for a in d.audits)


def test_resolve_records_the_target_values_an_op_replaces_so_a_resend_can_be_checked(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.pending[("customer", "cid0", "crm")] = {"limit": "150"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("erp", {"id": 5}, {"id": 5, "phone": "222", "credit_limit": "200"}), view)
    [op] = d.ops
    assert op.base == {"phone": "111", "limit": "150"}  # the shadow's phone; the queued op's limit


def test_resolve_records_an_unanswered_writes_echo_as_seen_so_ownership_can_compare_with_it(
    tmp_path: Path,
) -> None:
    view = View()
    view.link("cid0", "erp", "5")
    view.link("cid0", "crm", "001A")
    view.pending[("customer", "cid0", "crm")] = {"name": "Acme"}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Name": "Acme"}), view)
    assert d.fate == "noop" and d.seen == {"name": "Acme"}


def test_resolve_writes_the_newer_value_again_when_an_older_unanswered_write_lands_late(
    tmp_path: Path,
) -> None:
    """The CRM shows phone 676, which the agent sent before 687 and never heard back about."""
    view = View()
    linked(view)
    view.seen("cid0", "crm", T0 - timedelta(seconds=2), phone="687")
    view.late[("customer", "cid0", "crm")] = {"phone": ["676"]}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "676"}), view)
    assert [(o.target, dict(o.fields)) for o in d.ops] == [("crm", {"Phone": "687"})]
    assert d.ops[0].base == {"phone": "676"}
    assert [a.action for a in d.audits] == ["late_write_reasserted"]


def test_resolve_passes_on_a_crm_edit_to_a_value_the_agent_never_sent(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.late[("customer", "cid0", "crm")] = {"phone": ["676"]}
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "999"}), view)
    assert [o.target for o in d.ops] == ["erp"] and not d.audits


def test_resolve_treats_an_api_image_read_before_the_agent_recorded_its_write_as_history(tmp_path: Path) -> None:
    """Read at T0, resolved after the agent wrote limit 1234.5 (recorded at T0 + 1 s): its old limit is no edit."""
    view = View()
    linked(view)
    view.shadows[("customer", "cid0", "crm")]["limit"] = SeenValue("1234.5", None, T0 + timedelta(seconds=1))
    view.seen("cid0", "erp", T0 + timedelta(milliseconds=500), limit="1234.5")
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Credit_Limit__c": "100"}, ts=T0), view)
    assert d.ops == () and not d.audits and "limit" not in d.seen


def test_resolve_takes_an_api_edit_read_after_the_agent_recorded_its_write(tmp_path: Path) -> None:
    view = View()
    linked(view)
    view.shadows[("customer", "cid0", "crm")]["phone"] = SeenValue("111", None, T0 - timedelta(seconds=1))
    r = Resolver(config(tmp_path), own_origins=frozenset())
    d = r.resolve(change("crm", {"Id": "001A"}, {"Phone": "555"}, ts=T0), view)
    assert [o.target for o in d.ops] == ["erp"]

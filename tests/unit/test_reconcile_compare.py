"""The pure part of reconciliation: which fields drifted, who wins, and the report's JSON form."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from agent.config import EntityConfig, FieldRule, SystemMapping
from agent.reconcile import Drift, FieldCount, Missing, ReconcileReport, compare, same_value, winner_of


def _entity(
    *rules: FieldRule, systems: tuple[str, ...] = ("erp", "crm"), on_conflict: str = "latest"
) -> EntityConfig:
    return EntityConfig(
        name="customer",
        systems={s: SystemMapping(s, f"{s}.customers", "id") for s in systems},
        fields={r.name: r for r in rules},
        on_conflict=on_conflict,
    )


def _rule(
    name: str, owner: str, ftype: str = "string", systems: tuple[str, ...] = ("erp", "crm")
) -> FieldRule:
    return FieldRule(name=name, owner=owner, type=ftype, columns={s: f"{s}_{name}" for s in systems})


def test_compare_targets_the_non_owner_when_it_differs_from_the_owner() -> None:
    entity = _entity(_rule("name", "crm"), _rule("credit_limit", "erp", "decimal"))
    diffs = compare(
        entity,
        {"erp": {"name": "Acme", "credit_limit": "2500"}, "crm": {"name": "Acme", "credit_limit": "1000.5"}},
    )
    assert [(d.field, d.owner, d.winner, d.targets) for d in diffs] == [
        ("credit_limit", "erp", "erp", ("crm",))
    ]
    assert diffs[0].values == {"erp": "2500", "crm": "1000.5"}


def test_compare_skips_fields_not_mapped_or_not_read_in_two_systems() -> None:
    entity = _entity(_rule("notes", "erp", systems=("erp",)), _rule("phone", "erp"))
    assert compare(entity, {"erp": {"notes": "x", "phone": "1"}, "crm": {}}) == []


@pytest.mark.parametrize(
    "a,b,ftype,same",
    [
        ("", None, "string", True),
        ("x", None, "string", False),
        (None, None, "decimal", True),
        ("100.5", "100.5", "decimal", True),
        ("100.5", "100.50", "decimal", False),  # canonical values are already normalised
        (True, False, "bool", False),
        ("2025-06-30", "2025-06-30", "date", True),
    ],
)
def test_same_value_treats_only_empty_text_and_null_as_equal_when_values_differ(
    a: Any, b: Any, ftype: str, same: bool
) -> None:
    assert same_value(a, b, ftype) is same


def test_compare_reports_a_shared_field_without_a_winner_when_the_policy_is_latest() -> None:
    entity = _entity(_rule("phone", "shared"))
    (diff,) = compare(entity, {"erp": {"phone": "111"}, "crm": {"phone": "222"}})
    assert diff.owner == "shared" and diff.winner is None and diff.targets == ()


def test_compare_targets_the_losers_of_a_shared_field_when_a_system_is_named_to_win() -> None:
    entity = _entity(_rule("phone", "shared"), on_conflict="crm")
    (diff,) = compare(entity, {"erp": {"phone": "111"}, "crm": {"phone": "222"}})
    assert diff.winner == "crm" and diff.targets == ("erp",)


def test_compare_reports_every_differing_system_when_three_systems_hold_the_field() -> None:
    systems = ("erp", "crm", "hs")
    entity = _entity(_rule("name", "crm", systems=systems), systems=systems)
    (diff,) = compare(entity, {"erp": {"name": "B"}, "crm": {"name": "A"}, "hs": {"name": "C"}})
    assert diff.winner == "crm" and diff.targets == ("erp", "hs")


@pytest.mark.parametrize("others,drifted", [(("B", "C"), True), (("B", "B"), False)])
def test_compare_has_no_winner_when_the_owners_value_was_not_read(
    others: tuple[str, str], drifted: bool
) -> None:
    systems = ("erp", "crm", "hs")
    entity = _entity(_rule("name", "crm", systems=systems), systems=systems)
    diffs = compare(entity, {"erp": {"name": others[0]}, "hs": {"name": others[1]}})
    assert [(d.winner, d.targets) for d in diffs] == ([(None, ())] if drifted else [])


def test_winner_of_is_none_when_the_owner_system_is_absent() -> None:
    entity = _entity(_rule("name", "crm"))
    assert winner_of(entity, entity.fields["name"], ["erp"]) is None
    assert winner_of(entity, entity.fields["name"], ["erp", "crm"]) == "crm"


def _report() -> ReconcileReport:
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    drift = Drift(
        "c1",
        "name",
        "crm",
        {"erp": "1", "crm": "001X"},
        {"erp": "Old", "crm": None},
        "crm",
        ("erp",),
        "reported",
    )
    return ReconcileReport(
        entity="customer", run_id="r1", repair=False, started_at=at, finished_at=at, systems=("erp", "crm"),
        skipped_systems={}, records=2, compared=1, in_step=0, drifted_records=1, single_system=0,
        by_field=(FieldCount("name", "crm", 1, 0, 0),), missing_by_system={"crm": 1}, unreadable_count=0,
        ops_queued=0, exceptions_opened=0, drifts=(drift,),
        missing=(Missing("c2", "crm", "Account", "001Y", ("erp",), None),), unreadable=(), truncated=False,
    )  # fmt: skip


def test_report_as_dict_is_json_and_leaves_values_out_when_asked() -> None:
    report = _report()
    assert not report.ok
    with_values = json.loads(json.dumps(report.as_dict()))
    assert with_values["ok"] is False and with_values["started_at"] == "2025-01-02T03:04:05+00:00"
    assert with_values["drifts"][0]["values"] == {"erp": "Old", "crm": None}
    assert with_values["drifts"][0]["present"] == {"erp": True, "crm": False}
    assert with_values["missing"][0]["external_id"] == "001Y"
    without = report.as_dict(values=False)
    assert "values" not in without["drifts"][0] and "Old" not in json.dumps(without)

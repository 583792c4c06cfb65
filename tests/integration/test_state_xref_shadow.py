"""state.xref and state.shadow on a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from agent.errors import DataError
from state import shadow, xref
from state.db import State, open_state

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def test_xref_new_canonical_id_returns_distinct_hex_ids_when_called() -> None:
    a, b = xref.new_canonical_id(), xref.new_canonical_id()
    assert a != b and len(a) == 32 and int(a, 16) >= 0


def test_xref_link_is_idempotent_and_lookups_agree_when_linked(st: State) -> None:
    assert xref.link(st, "customer", "c1", "erp", "42") is True
    assert xref.link(st, "customer", "c1", "erp", "42") is False
    xref.link(st, "customer", "c1", "salesforce", "001A")
    assert xref.lookup(st, "customer", "salesforce", "001A") == "c1"
    assert xref.lookup(st, "contact", "salesforce", "001A") is None
    assert xref.external_id(st, "customer", "c1", "erp") == "42"
    assert xref.external_id(st, "customer", "c1", "hubspot") is None
    assert xref.members(st, "customer", "c1") == {"erp": "42", "salesforce": "001A"}


def test_xref_link_raises_data_error_when_record_already_has_other_id_in_system(st: State) -> None:
    xref.link(st, "customer", "c1", "erp", "42")
    with pytest.raises(DataError):
        xref.link(st, "customer", "c1", "erp", "43")
    assert xref.members(st, "customer", "c1") == {"erp": "42"}


def test_xref_link_raises_data_error_when_external_id_belongs_to_other_record(st: State) -> None:
    xref.link(st, "customer", "c1", "erp", "42")
    with pytest.raises(DataError, match="c1"):
        xref.link(st, "customer", "c2", "erp", "42")
    assert xref.members(st, "customer", "c2") == {}


def test_xref_page_walks_canonical_records_in_order_when_paged(st: State) -> None:
    for i in range(5):
        xref.link(st, "project", f"p{i}", "erp", str(i))
        xref.link(st, "project", f"p{i}", "salesforce", f"a0{i}")
    xref.link(st, "customer", "c9", "erp", "9")
    first = xref.page(st, "project", limit=2)
    assert first == [("p0", {"erp": "0", "salesforce": "a00"}), ("p1", {"erp": "1", "salesforce": "a01"})]
    rest = xref.page(st, "project", after_canonical_id="p1", limit=10)
    assert [cid for cid, _ in rest] == ["p2", "p3", "p4"]
    assert xref.page(st, "project", after_canonical_id="p4") == []


def test_xref_count_counts_canonical_records_not_links_when_asked(st: State) -> None:
    xref.link(st, "project", "p1", "erp", "1")
    xref.link(st, "project", "p1", "salesforce", "a1")
    xref.link(st, "customer", "c1", "erp", "1")
    assert xref.count(st, "project") == 1
    assert xref.count(st) == 2
    assert xref.count(st, "invoice") == 0


def test_xref_find_natural_returns_record_when_value_noted(st: State) -> None:
    assert xref.note_natural(st, "customer", "vat", "GB123", "c1") is True
    assert xref.find_natural(st, "customer", "vat", "GB123") == "c1"
    assert xref.find_natural(st, "customer", "vat", "GB999") is None
    assert xref.find_natural(st, "contact", "vat", "GB123") is None


def test_xref_note_natural_keeps_first_holder_when_value_claimed_twice(st: State) -> None:
    xref.note_natural(st, "customer", "vat", "GB123", "c1")
    assert xref.note_natural(st, "customer", "vat", "GB123", "c2") is False
    assert xref.find_natural(st, "customer", "vat", "GB123") == "c1"


def test_xref_note_natural_drops_old_value_when_record_value_changes(st: State) -> None:
    xref.note_natural(st, "customer", "vat", "GB123", "c1")
    xref.note_natural(st, "customer", "vat", "GB456", "c1")
    assert xref.find_natural(st, "customer", "vat", "GB123") is None
    assert xref.find_natural(st, "customer", "vat", "GB456") == "c1"


def test_shadow_get_returns_empty_when_record_never_seen(st: State) -> None:
    assert shadow.get(st, "customer", "c1") == {}


def test_shadow_put_then_get_round_trips_values_per_system_when_written(st: State) -> None:
    shadow.put(st, "customer", "c1", {"name": "Acme", "credit": Decimal("5000.00"), "fax": None},
               system="erp", by_agent=False, source_ts=T0)  # fmt: skip
    shadow.put(st, "customer", "c1", {"name": "Acme Ltd"}, system="salesforce", by_agent=True, source_ts=None)
    erp = shadow.get(st, "customer", "c1", "erp")
    assert {k: v.value for k, v in erp.items()} == {"name": "Acme", "credit": "5000.00", "fax": None}
    assert erp["name"].system == "erp" and not erp["name"].written_by_agent and erp["name"].source_ts == T0
    sf = shadow.get(st, "customer", "c1", "salesforce")
    assert sf["name"].value == "Acme Ltd" and sf["name"].written_by_agent and sf["name"].source_ts is None
    assert shadow.get(st, "customer", "c1", "hubspot") == {}


def test_shadow_get_without_system_returns_latest_value_per_field_when_systems_differ(st: State) -> None:
    shadow.put(
        st, "customer", "c1", {"name": "Acme", "city": "Leeds"}, system="erp", by_agent=False, source_ts=T0
    )
    shadow.put(st, "customer", "c1", {"name": "Acme Ltd"}, system="salesforce", by_agent=False, source_ts=T0)
    latest = shadow.get(st, "customer", "c1")
    assert (latest["name"].value, latest["name"].system) == ("Acme Ltd", "salesforce")
    assert (latest["city"].value, latest["city"].system) == ("Leeds", "erp")


def test_shadow_put_replaces_earlier_value_when_field_seen_again(st: State) -> None:
    shadow.put(st, "customer", "c1", {"name": "Acme"}, system="erp", by_agent=False, source_ts=T0)
    shadow.put(st, "customer", "c1", {"name": "Acme 2"}, system="erp", by_agent=True, source_ts=None)
    got = shadow.get(st, "customer", "c1", "erp")["name"]
    assert (got.value, got.written_by_agent) == ("Acme 2", True)


def test_shadow_forget_drops_every_system_when_record_deleted(st: State) -> None:
    shadow.put(st, "customer", "c1", {"a": 1, "b": 2}, system="erp", by_agent=False, source_ts=None)
    shadow.put(st, "customer", "c1", {"a": 1}, system="salesforce", by_agent=True, source_ts=None)
    shadow.put(st, "customer", "c2", {"a": 1}, system="erp", by_agent=False, source_ts=None)
    assert shadow.forget(st, "customer", "c1") == 3
    assert shadow.get(st, "customer", "c1") == {}
    assert shadow.get(st, "customer", "c2") != {}

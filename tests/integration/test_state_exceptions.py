"""state.exceptions, state.audit and state.health on a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from state import audit, exceptions, health
from state.db import State, open_state


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def item(st: State, **kw: object) -> int:
    args: dict[str, object] = {
        "kind": "validation",
        "reason": "missing_tax_code",
        "detail": "tax code VAT20 is not set up in the ERP",
        "trace_id": "t1",
        "source": "salesforce",
        "entity": "invoice",
        "canonical_id": "i1",
        "record": {"object": "Invoice__c", "key": {"Id": "a01"}},
        "field": "tax_code",
        "journal_seq": 10,
        "blocking_ref": "tax_code=VAT20",
    }
    args.update(kw)
    return exceptions.open_item(st, **args)  # type: ignore[arg-type]


def test_exceptions_open_item_bumps_attempts_instead_of_duplicating_when_replayed(st: State) -> None:
    first = item(st)
    assert item(st, detail="still missing") == first
    [only] = exceptions.list_items(st)
    assert (only.id, only.attempts, only.detail) == (first, 2, "still missing")
    assert only.record == {"object": "Invoice__c", "key": {"Id": "a01"}}


@pytest.mark.parametrize(
    "other",
    [{"journal_seq": 11}, {"reason": "missing_customer"}, {"kind": "ownership"}, {"op_id": 5}],
)
def test_exceptions_open_item_opens_new_item_when_problem_differs(
    st: State, other: dict[str, object]
) -> None:
    assert item(st) != item(st, **other)


def test_exceptions_open_item_compares_trace_when_no_seq_or_op(st: State) -> None:
    a = item(st, journal_seq=None, trace_id="t1")
    assert item(st, journal_seq=None, trace_id="t1") == a
    assert item(st, journal_seq=None, trace_id="t2") != a


def test_exceptions_open_item_reuses_retrying_item_and_reopens_it_when_retry_fails(st: State) -> None:
    first = item(st)
    assert exceptions.mark_retrying(st, first)
    assert item(st) == first
    got = exceptions.get(st, first)
    assert got is not None and (got.status, got.attempts) == ("open", 2)


def test_exceptions_resolve_closes_item_and_writes_audit_row_when_operator_resolves(st: State) -> None:
    first = item(st)
    assert exceptions.resolve(st, first, actor="bob", resolution="created tax code") is True
    assert exceptions.resolve(st, first, actor="bob", resolution="again") is False
    got = exceptions.get(st, first)
    assert got is not None and (got.status, got.resolved_by, got.resolution) == (
        "resolved",
        "bob",
        "created tax code",
    )
    assert got.resolved_at is not None
    [rec] = audit.list_records(st, action="exception_resolved")
    assert (rec.actor, rec.trace_id, rec.entity, rec.detail["exception_id"]) == (
        "bob",
        "t1",
        "invoice",
        first,
    )
    assert item(st) != first  # a resolved item is not reused


def test_exceptions_reopen_returns_item_to_open_when_fix_did_not_hold(st: State) -> None:
    first = item(st)
    exceptions.resolve(st, first, actor="bob", resolution="done")
    assert exceptions.reopen(st, first, actor="bob") is True
    got = exceptions.get(st, first)
    assert got is not None and got.status == "open" and got.resolved_by is None
    assert exceptions.reopen(st, first, actor="bob") is False


def test_exceptions_list_items_filters_by_status_when_asked(st: State) -> None:
    a, b = item(st), item(st, journal_seq=11)
    exceptions.resolve(st, a, actor="x", resolution="y")
    assert [i.id for i in exceptions.list_items(st)] == [b]
    assert [i.id for i in exceptions.list_items(st, status="resolved")] == [a]
    assert [i.id for i in exceptions.list_items(st, status=None)] == [a, b]


def test_exceptions_stats_counts_unresolved_per_reason_when_mixed(st: State) -> None:
    a = item(st)
    item(st, journal_seq=11)
    item(st, journal_seq=12, reason="missing_customer")
    exceptions.resolve(st, a, actor="x", resolution="y")
    stats = exceptions.stats(st)
    assert {k: v.count for k, v in stats.items()} == {"missing_tax_code": 1, "missing_customer": 1}
    assert all(v.oldest_created_at.tzinfo is not None for v in stats.values())


def test_exceptions_blocked_on_matches_prefix_literally_when_prefix_has_wildcards(st: State) -> None:
    a = item(st, blocking_ref="tax_code=VAT20")
    item(st, journal_seq=11, blocking_ref="tax_code=VAT5")
    item(st, journal_seq=12, blocking_ref="customer=42")
    item(st, journal_seq=13, blocking_ref="tax%code=VAT20")
    assert [i.id for i in exceptions.blocked_on(st, "tax_code=VAT20")] == [a]
    assert len(exceptions.blocked_on(st, "tax_code=")) == 2
    assert exceptions.blocked_on(st, "tax_") != exceptions.blocked_on(st, "tax")
    exceptions.resolve(st, a, actor="x", resolution="y")
    assert exceptions.blocked_on(st, "tax_code=VAT20") == []


def test_audit_record_appends_rows_listed_newest_first_when_filtered(st: State) -> None:
    a = audit.record(st, "ownership_ignored", trace_id="t1", entity="contract", canonical_id="k1",
                     detail={"field": "amount", "owner": "erp"})  # fmt: skip
    b = audit.record(st, "conflict_resolved", actor="agent", detail={"winner": "salesforce"})
    assert b > a
    assert [r.id for r in audit.list_records(st)] == [b, a]
    [rec] = audit.list_records(st, action="ownership_ignored")
    assert (rec.trace_id, rec.entity, rec.canonical_id, rec.actor) == ("t1", "contract", "k1", "agent")
    assert rec.detail == {"field": "amount", "owner": "erp"}
    assert [r.id for r in audit.list_records(st, trace_id="t1")] == [a]
    assert audit.list_records(st, limit=1)[0].id == b


def test_health_record_success_accumulates_changes_and_keeps_gauges_when_not_given(st: State) -> None:
    oldest = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    health.record_success(st, "erp", "wal", changes=10, lag_bytes=4096, oldest_unconsumed_at=oldest)
    health.record_success(st, "erp", "wal", changes=5)
    [h] = health.all_health(st)
    assert (h.state, h.changes_total, h.lag_bytes, h.oldest_unconsumed_at) == ("ok", 15, 4096, oldest)
    assert h.last_success_at is not None and h.last_error is None


def test_health_record_error_keeps_last_success_when_run_fails(st: State) -> None:
    health.record_success(st, "salesforce", "Account", changes=1)
    health.record_error(st, "salesforce", "Account", error="AuthError: token refused", state="stopped")
    [h] = health.all_health(st)
    assert (h.state, h.last_error) == ("stopped", "AuthError: token refused")
    assert h.last_success_at is not None and h.last_error_at is not None
    health.record_success(st, "salesforce", "Account", changes=0)
    assert health.all_health(st)[0].state == "ok"


def test_health_set_gauges_replaces_gauges_without_touching_state_when_called(st: State) -> None:
    health.record_error(st, "erp", "wal", error="RetryableError: connection refused")
    health.set_gauges(
        st, "erp", "wal", lag_bytes=1 << 30, oldest_unconsumed_at=None, detail={"slot": "syncagent"}
    )
    health.set_gauges(st, "erp", "slot", lag_bytes=0)
    by_stream = {h.stream: h for h in health.all_health(st)}
    wal = by_stream["wal"]
    assert (wal.state, wal.lag_bytes, wal.detail, wal.changes_total) == (
        "error",
        1 << 30,
        {"slot": "syncagent"},
        0,
    )
    assert by_stream["slot"].state == "ok" and by_stream["slot"].last_success_at is None

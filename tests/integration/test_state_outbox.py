"""state.outbox on a real SQLite file: enqueue, claim, retry, reject, requeue, depth."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from agent.model import Op
from state import outbox
from state.db import State, open_state

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def op(n: int, *, target: str = "salesforce", cid: str = "c1") -> Op:
    return Op(
        idempotency_key=f"{target}:{cid}:{n}",
        target=target,
        entity="contract",
        canonical_id=cid,
        object_name="Opportunity",
        action="upsert",
        key={"ERP_Id__c": f"P-{n}"},
        fields={"Amount": Decimal("100.00"), "StageName": "Closed Won"},
        trace_id=f"trace{n:011d}",
        source_seq=n,
        canonical={"amount": Decimal("100.00")},
    )


def test_outbox_enqueue_skips_known_idempotency_keys_when_replayed(st: State) -> None:
    assert outbox.enqueue(st, [op(1), op(2)], now=NOW) == 2
    assert outbox.enqueue(st, [op(2), op(3)], now=NOW) == 1
    assert [o.source_seq for o in outbox.claim_due(st, "salesforce", now=NOW, limit=10)] == [1, 2, 3]


def test_outbox_claim_due_returns_ops_with_id_and_attempts_in_order_when_due(st: State) -> None:
    outbox.enqueue(st, [op(1), op(2, target="erp"), op(3)], now=NOW)
    claimed = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert [o.source_seq for o in claimed] == [1, 3]
    first = claimed[0]
    assert first.op_id is not None and first.attempts == 0
    assert first.fields == {"Amount": "100.00", "StageName": "Closed Won"}
    assert first.canonical == {"amount": "100.00"}
    assert (first.key, first.trace_id, first.action) == ({"ERP_Id__c": "P-1"}, "trace00000000001", "upsert")
    assert len(outbox.claim_due(st, "salesforce", now=NOW, limit=1)) == 1


def test_outbox_mark_retry_defers_op_and_counts_attempt_when_delivery_failed(st: State) -> None:
    outbox.enqueue(st, [op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None
    assert outbox.mark_retry(st, o.op_id, next_attempt_at=NOW + timedelta(minutes=5), reason="HTTP 503")
    assert outbox.claim_due(st, "salesforce", now=NOW + timedelta(minutes=4), limit=10) == []
    [again] = outbox.claim_due(st, "salesforce", now=NOW + timedelta(minutes=5), limit=10)
    assert again.attempts == 1
    row = outbox.get(st, o.op_id)
    assert row is not None and (row.status, row.last_error) == ("pending", "HTTP 503")


def test_outbox_mark_applied_records_external_id_once_when_applied_twice(st: State) -> None:
    outbox.enqueue(st, [op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None
    assert outbox.mark_applied(st, o.op_id, "006XYZ", "v7") is True
    assert outbox.mark_applied(st, o.op_id, "006OTHER", None) is False
    row = outbox.get(st, o.op_id)
    assert row is not None and (row.status, row.external_id, row.version) == ("applied", "006XYZ", "v7")
    assert outbox.claim_due(st, "salesforce", now=NOW, limit=10) == []


def test_outbox_requeue_makes_rejected_op_due_with_zero_attempts_when_operator_retries(st: State) -> None:
    outbox.enqueue(st, [op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None
    outbox.mark_retry(st, o.op_id, next_attempt_at=NOW, reason="timeout")
    assert outbox.mark_rejected(st, o.op_id, "missing_tax_code") is True
    assert outbox.claim_due(st, "salesforce", now=NOW + timedelta(days=1), limit=10) == []
    assert outbox.requeue(st, o.op_id, now=NOW) is True
    assert outbox.requeue(st, o.op_id, now=NOW) is False
    [back] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert (back.op_id, back.attempts) == (o.op_id, 0)


def test_outbox_cancel_withdraws_pending_op_when_superseded(st: State) -> None:
    outbox.enqueue(st, [op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None and outbox.cancel(st, o.op_id)
    assert outbox.pending_for(st, "contract", "c1") == []


def test_outbox_get_returns_none_when_op_unknown(st: State) -> None:
    assert outbox.get(st, 999) is None
    assert outbox.mark_applied(st, 999, "x") is False


def test_outbox_depth_reports_backlog_per_target_when_some_ops_retry(st: State) -> None:
    outbox.enqueue(st, [op(1), op(2), op(3, target="erp")], now=NOW)
    [first, _] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert first.op_id is not None
    outbox.mark_retry(st, first.op_id, next_attempt_at=NOW + timedelta(hours=1), reason="429")
    depth = outbox.depth(st, now=NOW)
    assert depth["salesforce"] == outbox.OutboxDepth(pending=2, due=1, oldest_at=NOW, retrying=1)
    assert depth["erp"] == outbox.OutboxDepth(pending=1, due=1, oldest_at=NOW, retrying=0)


def test_outbox_pending_for_lists_one_records_ops_when_several_records_queued(st: State) -> None:
    outbox.enqueue(st, [op(1, cid="c1"), op(2, cid="c2"), op(3, cid="c1", target="erp")], now=NOW)
    assert [(o.target, o.source_seq) for o in outbox.pending_for(st, "contract", "c1")] == [
        ("salesforce", 1),
        ("erp", 3),
    ]


def test_outbox_prune_removes_only_old_finished_ops_when_cutoff_given(st: State) -> None:
    outbox.enqueue(st, [op(1), op(2), op(3)], now=NOW)
    a, b, _ = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert a.op_id is not None and b.op_id is not None
    outbox.mark_applied(st, a.op_id, "006A")
    outbox.mark_rejected(st, b.op_id, "bad")
    assert outbox.prune(st, older_than=datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert outbox.prune(st, older_than=datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert outbox.get(st, a.op_id) is None
    assert outbox.get(st, b.op_id) is not None


def _doubt(st: State, op_id: int) -> bool:
    [o] = [
        x
        for x in outbox.claim_due(st, "salesforce", now=NOW + timedelta(days=1), limit=10)
        if x.op_id == op_id
    ]
    return o.in_doubt


@pytest.mark.parametrize(
    "steps,in_doubt",
    [
        ([], False),
        (["send"], True),  # sent, then the process died before the answer was recorded
        (["send", "refused"], False),  # a 429: the target said it did not take it
        (["send", "unknown"], True),  # a timeout or a 5xx: it may have landed
        (["send", "unknown", "send", "refused"], True),  # a later refusal says nothing of the earlier send
        (["send", "send"], True),  # died twice
        (["send", "unknown", "not_sent"], True),  # the read before the resend failed: still in doubt
        (["send", "not_sent"], True),
    ],
)
def test_outbox_in_doubt_follows_what_each_attempt_tells_about_the_target_when_sends_fail(
    st: State, steps: list[str], in_doubt: bool
) -> None:
    outbox.enqueue(st, [op(1)], now=NOW)
    [o] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert o.op_id is not None and o.in_doubt is False
    later = NOW + timedelta(seconds=1)
    for step in steps:
        if step == "send":
            outbox.mark_sending(st, [o.op_id])
        else:
            outbox.mark_retry(st, o.op_id, next_attempt_at=later, reason="x", outcome=step)  # type: ignore[arg-type]
    assert _doubt(st, o.op_id) is in_doubt


def test_outbox_applied_clears_the_doubt_when_the_answer_arrives(st: State) -> None:
    outbox.enqueue(st, [op(1), op(2)], now=NOW)
    a, b = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert a.op_id is not None and b.op_id is not None
    outbox.mark_sending(st, [a.op_id, b.op_id])
    outbox.mark_applied(st, a.op_id, "001")
    [left] = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert left.op_id == b.op_id and left.in_doubt
    assert outbox.late_values(st, "contract", "c1", "salesforce") == {}


def test_outbox_late_values_lists_what_an_op_applied_after_doubt_wrote(st: State) -> None:
    """An op sent, left unanswered, then applied: its first attempt may still land late."""
    outbox.enqueue(st, [op(1), op(2)], now=NOW)
    a, b = outbox.claim_due(st, "salesforce", now=NOW, limit=10)
    assert a.op_id is not None and b.op_id is not None
    outbox.mark_sending(st, [a.op_id, b.op_id])
    outbox.mark_retry(st, a.op_id, next_attempt_at=NOW, reason="timeout", outcome="unknown")
    outbox.mark_applied(st, b.op_id, "001")  # answered at once: nothing of it can land later
    outbox.mark_sending(st, [a.op_id])
    outbox.mark_applied(st, a.op_id, "001")
    assert outbox.late_values(st, "contract", "c1", "salesforce") == {"amount": ["100.00"]}

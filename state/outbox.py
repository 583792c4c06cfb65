"""The outbox: operations waiting for a target, with their attempts and next attempt time.

``pending`` ops are delivered in ``op_id`` order per target (so two updates of one record
arrive in the order they were resolved). ``claim_due`` only reads: one deliverer runs per
target (the scheduler's ``max_instances=1``), and an op whose delivery was cut short by a
crash is still pending and marked ``in_doubt`` (``mark_sending`` before each send), so the
next attempt reads the target first (``agent.resend``) instead of overwriting newer edits.
Statuses move ``pending`` -> ``applied`` | ``rejected`` | ``cancelled``; an operator can
``requeue`` a rejected op. An op that belongs to a workflow instance carries its key in
``workflow``, so delivery can tell when the instance's last op went through.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.model import Op, utcnow
from state import codec
from state.db import State, classify_sqlite, fetch_all, fetch_one

_ERROR_MAX = 2000

_INSERT = (
    "INSERT INTO outbox (idempotency_key, target, entity, canonical_id, object_name, action,"
    " key, fields, canonical, base, trace_id, source_seq, workflow, status, attempts, next_attempt_at,"
    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox op with its delivery state."""

    op: Op
    status: str
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    external_id: str | None
    version: str | None


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    """Per-target backlog for ``status``: pending ops, how many are due, oldest, in retry."""

    pending: int
    due: int
    oldest_at: datetime | None
    retrying: int


def _op(r: sqlite3.Row) -> Op:
    return Op(
        idempotency_key=r["idempotency_key"],
        target=r["target"],
        entity=r["entity"],
        canonical_id=r["canonical_id"],
        object_name=r["object_name"],
        action=r["action"],
        key=codec.loads(r["key"]),
        fields=codec.loads(r["fields"]),
        canonical=codec.loads(r["canonical"]),
        trace_id=r["trace_id"],
        source_seq=r["source_seq"],
        op_id=r["op_id"],
        attempts=r["attempts"],
        workflow=r["workflow"],
        in_doubt=bool(r["in_doubt"]),
        base=codec.loads(r["base"]),
    )


def enqueue(st: State, ops: Sequence[Op], *, now: datetime | None = None) -> int:
    """Add ops, due now; an op whose idempotency key is already queued is skipped. Return new ops."""
    if not ops:
        return 0
    ts = codec.format_ts(now or utcnow())
    rows = [
        (
            op.idempotency_key,
            op.target,
            op.entity,
            op.canonical_id,
            op.object_name,
            op.action,
            codec.dumps(op.key),
            codec.dumps(op.fields),
            codec.dumps(op.canonical),
            codec.dumps(op.base),
            op.trace_id,
            op.source_seq,
            op.workflow,
            ts,
            ts,
            ts,
        )
        for op in ops
    ]
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.executemany(_INSERT, rows)
    return cur.rowcount


def claim_due(st: State, target: str, *, now: datetime, limit: int) -> list[Op]:
    """Return up to ``limit`` pending ops for ``target`` due by ``now``, oldest ``op_id`` first.

    An op waits while an older op for the same record and target is still pending but not
    due (backing off): otherwise the newer one would land first and the older one would
    overwrite it later.
    """
    due = codec.format_ts(now)
    rows = fetch_all(
        st,
        "SELECT * FROM outbox AS o WHERE o.target = ? AND o.status = 'pending' AND o.next_attempt_at <= ?"
        " AND NOT EXISTS (SELECT 1 FROM outbox AS e WHERE e.entity = o.entity"
        " AND e.canonical_id = o.canonical_id AND e.target = o.target AND e.status = 'pending'"
        " AND e.op_id < o.op_id AND e.next_attempt_at > ?)"
        " ORDER BY o.op_id LIMIT ?",
        (target, due, due, limit),
    )
    return [_op(r) for r in rows]


def _update(st: State, sql: str, params: tuple[object, ...]) -> bool:
    with st.write_txn(), classify_sqlite(st.path):
        return st.conn.execute(sql, params).rowcount == 1


def mark_applied(st: State, op_id: int, external_id: str, version: str | None = None) -> bool:
    """Mark a pending op applied with the target's id; ``False`` if it was not pending."""
    return _update(
        st,
        "UPDATE outbox SET status = 'applied', external_id = ?, version = ?, attempts = attempts + 1,"
        " last_error = NULL, in_doubt = CASE WHEN in_doubt = 2 THEN 3 ELSE 0 END, updated_at = ?"
        " WHERE op_id = ? AND status = 'pending'",
        (external_id, version, codec.format_ts(utcnow()), op_id),
    )


# in_doubt: 0 settled; 1 sent, answer not yet recorded; 2 an earlier attempt may have landed;
# 3 applied, but an earlier attempt may still land late (a server finishing a dead client's call).
_DOUBT_AFTER = {
    "refused": "CASE WHEN in_doubt = 2 THEN 2 ELSE 0 END",
    "unknown": "2",
    "not_sent": "in_doubt",
}


def mark_retry(
    st: State,
    op_id: int,
    *,
    next_attempt_at: datetime,
    reason: str,
    outcome: Literal["refused", "unknown", "not_sent"] = "refused",
) -> bool:
    """Count a failed attempt and keep the op pending until ``next_attempt_at``.

    ``outcome`` says what the attempt tells about the target: it refused the write (which
    settles this attempt, not an earlier one left in doubt); the write may have landed (a
    timeout, a 5xx); or nothing was sent.
    """
    return _update(
        st,
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?,"
        f" in_doubt = {_DOUBT_AFTER[outcome]}, updated_at = ? WHERE op_id = ? AND status = 'pending'",
        (codec.format_ts(next_attempt_at), reason[:_ERROR_MAX], codec.format_ts(utcnow()), op_id),
    )


def mark_sending(st: State, op_ids: Sequence[int]) -> None:
    """Record that these ops are about to be sent: until an answer is recorded they are in doubt.

    An op already in doubt (an earlier send unanswered) stays so: this send's answer will
    not tell whether the earlier one landed.
    """
    _each(
        st,
        op_ids,
        "UPDATE outbox SET in_doubt = CASE WHEN in_doubt > 0 THEN 2 ELSE 1 END"
        " WHERE op_id = ? AND status = 'pending'",
    )


def _each(st: State, op_ids: Sequence[int], sql: str) -> None:
    if op_ids:
        with st.write_txn(), classify_sqlite(st.path):
            st.conn.executemany(sql, [(i,) for i in op_ids])


def mark_rejected(st: State, op_id: int, reason: str) -> bool:
    """Mark a pending op rejected for good (its exception item says why)."""
    return _update(
        st,
        "UPDATE outbox SET status = 'rejected', attempts = attempts + 1, last_error = ?,"
        " updated_at = ? WHERE op_id = ? AND status = 'pending'",
        (reason[:_ERROR_MAX], codec.format_ts(utcnow()), op_id),
    )


def cancel(st: State, op_id: int) -> bool:
    """Withdraw a pending op (superseded, or an operator decided); ``False`` if not pending."""
    return _update(
        st,
        "UPDATE outbox SET status = 'cancelled', updated_at = ? WHERE op_id = ? AND status = 'pending'",
        (codec.format_ts(utcnow()), op_id),
    )


def requeue(st: State, op_id: int, *, now: datetime | None = None) -> bool:
    """Put a rejected op back to pending, due now, with its attempts reset."""
    ts = codec.format_ts(now or utcnow())
    return _update(
        st,
        "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = ?, updated_at = ?"
        " WHERE op_id = ? AND status = 'rejected'",
        (ts, ts, op_id),
    )


def get(st: State, op_id: int) -> OutboxRow | None:
    """Return one outbox op with its delivery state, or ``None``."""
    r = fetch_one(st, "SELECT * FROM outbox WHERE op_id = ?", (op_id,))
    if r is None:
        return None
    return OutboxRow(
        op=_op(r),
        status=r["status"],
        next_attempt_at=codec.parse_ts(r["next_attempt_at"]),
        last_error=r["last_error"],
        created_at=codec.parse_ts(r["created_at"]),
        updated_at=codec.parse_ts(r["updated_at"]),
        external_id=r["external_id"],
        version=r["version"],
    )


def depth(st: State, *, now: datetime | None = None) -> dict[str, OutboxDepth]:
    """Return the pending backlog per target."""
    rows = fetch_all(
        st,
        "SELECT target, count(*) AS pending, sum(next_attempt_at <= ?) AS due,"
        " min(created_at) AS oldest, sum(attempts > 0) AS retrying"
        " FROM outbox WHERE status = 'pending' GROUP BY target ORDER BY target",
        (codec.format_ts(now or utcnow()),),
    )
    return {
        r["target"]: OutboxDepth(
            pending=r["pending"],
            due=r["due"] or 0,
            oldest_at=codec.parse_ts_or_none(r["oldest"]),
            retrying=r["retrying"] or 0,
        )
        for r in rows
    }


def pending_for(st: State, entity: str, canonical_id: str) -> list[Op]:
    """Return the pending ops of one canonical record, oldest first."""
    rows = fetch_all(
        st,
        "SELECT * FROM outbox WHERE entity = ? AND canonical_id = ? AND status = 'pending' ORDER BY op_id",
        (entity, canonical_id),
    )
    return [_op(r) for r in rows]


def late_values(st: State, entity: str, canonical_id: str, target: str) -> dict[str, list[Any]]:
    """Values applied ops wrote to ``target`` whose earlier, unanswered attempt may still land.

    Such an attempt, still being served when the agent that sent it died, can land after a
    newer write and roll the record back; capture then sees one of these values again.
    """
    rows = fetch_all(
        st,
        "SELECT canonical FROM outbox WHERE entity = ? AND canonical_id = ? AND target = ?"
        " AND status = 'applied' AND in_doubt = 3 ORDER BY op_id",
        (entity, canonical_id, target),
    )
    return values_by_field(codec.loads(r["canonical"]) for r in rows)


def values_by_field(canonicals: Iterable[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """``{field: [value, ...]}`` over several ops' canonical values, in the order given."""
    out: dict[str, list[Any]] = {}
    for canonical in canonicals:
        for name, value in canonical.items():
            out.setdefault(name, []).append(value)
    return out


def pending_for_workflow(st: State, instance_key: str) -> int:
    """Return how many ops of one workflow instance are still pending."""
    r = fetch_one(
        st,
        "SELECT count(*) AS n FROM outbox WHERE workflow = ? AND status = 'pending'",
        (instance_key,),
    )
    return 0 if r is None else int(r["n"])


def prune(st: State, *, older_than: datetime) -> int:
    """Delete applied and cancelled ops last touched before ``older_than``; return how many."""
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.execute(
            "DELETE FROM outbox WHERE status IN ('applied', 'cancelled') AND updated_at < ?",
            (codec.format_ts(older_than),),
        )
    return cur.rowcount

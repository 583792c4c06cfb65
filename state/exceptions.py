"""The exception queue: records a person must look at, each with its trace and a typed reason.

An item is ``open``, then possibly ``retrying`` (an operator or a dependency asked for another
try), and finally ``resolved``. Opening the same problem again while it is unresolved (same
kind, reason, journal seq and op id) bumps ``attempts`` on the existing item, so a replay of
the journal does not duplicate the queue. ``blocking_ref`` names what must appear before a
retry can succeed (``"tax_code=VAT20"``), so the agent can find items to retry when it does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.model import utcnow
from state import audit, codec
from state.db import State, classify_sqlite, fetch_all, fetch_one

ExceptionStatus = Literal["open", "retrying", "resolved"]

_DETAIL_MAX = 4000


@dataclass(frozen=True, slots=True)
class ExceptionItem:
    """One item of the exception queue."""

    id: int
    created_at: datetime
    updated_at: datetime
    status: str
    kind: str
    reason: str
    detail: str
    trace_id: str
    source: str | None
    entity: str | None
    canonical_id: str | None
    record: Mapping[str, Any] | None
    field: str | None
    journal_seq: int | None
    op_id: int | None
    attempts: int
    blocking_ref: str | None
    resolved_by: str | None
    resolution: str | None
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class ExceptionStats:
    """Unresolved items of one reason: how many, and since when."""

    count: int
    oldest_created_at: datetime


def _item(r: sqlite3.Row) -> ExceptionItem:
    return ExceptionItem(
        id=r["id"],
        created_at=codec.parse_ts(r["created_at"]),
        updated_at=codec.parse_ts(r["updated_at"]),
        status=r["status"],
        kind=r["kind"],
        reason=r["reason"],
        detail=r["detail"],
        trace_id=r["trace_id"],
        source=r["source"],
        entity=r["entity"],
        canonical_id=r["canonical_id"],
        record=None if r["record"] is None else codec.loads(r["record"]),
        field=r["field"],
        journal_seq=r["journal_seq"],
        op_id=r["op_id"],
        attempts=r["attempts"],
        blocking_ref=r["blocking_ref"],
        resolved_by=r["resolved_by"],
        resolution=r["resolution"],
        resolved_at=codec.parse_ts_or_none(r["resolved_at"]),
    )


def open_item(
    st: State,
    *,
    kind: str,
    reason: str,
    detail: str,
    trace_id: str,
    source: str | None = None,
    entity: str | None = None,
    canonical_id: str | None = None,
    record: Mapping[str, Any] | None = None,
    field: str | None = None,
    journal_seq: int | None = None,
    op_id: int | None = None,
    blocking_ref: str | None = None,
) -> int:
    """Open an item, or bump the unresolved one for the same problem; return its id.

    The same problem is the same ``(kind, reason, journal_seq, op_id)``; when both positions
    are ``None`` the trace id is compared too, so unrelated records are not merged.
    """
    now = codec.format_ts(utcnow())
    detail = detail[:_DETAIL_MAX]
    with st.write_txn():
        sql = (
            "SELECT id FROM exceptions WHERE status != 'resolved' AND kind = ? AND reason = ?"
            " AND journal_seq IS ? AND op_id IS ?"
        )
        params: list[object] = [kind, reason, journal_seq, op_id]
        if journal_seq is None and op_id is None:
            sql += " AND trace_id = ?"
            params.append(trace_id)
        existing = fetch_one(st, sql + " ORDER BY id LIMIT 1", params)
        with classify_sqlite(st.path):
            if existing is not None:
                st.conn.execute(
                    "UPDATE exceptions SET attempts = attempts + 1, status = 'open', detail = ?,"
                    " blocking_ref = ?, updated_at = ? WHERE id = ?",
                    (detail, blocking_ref, now, existing["id"]),
                )
                return int(existing["id"])
            cur = st.conn.execute(
                "INSERT INTO exceptions (created_at, updated_at, status, kind, reason, detail,"
                " trace_id, source, entity, canonical_id, record, field, journal_seq, op_id,"
                " attempts, blocking_ref) VALUES (?, ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (
                    now,
                    now,
                    kind,
                    reason,
                    detail,
                    trace_id,
                    source,
                    entity,
                    canonical_id,
                    None if record is None else codec.dumps(record),
                    field,
                    journal_seq,
                    op_id,
                    blocking_ref,
                ),
            )
    return int(cur.lastrowid or 0)


def list_items(
    st: State, *, status: ExceptionStatus | None = "open", limit: int = 100
) -> list[ExceptionItem]:
    """Return items with ``status`` (``None``: all), oldest first."""
    if status is None:
        rows = fetch_all(st, "SELECT * FROM exceptions ORDER BY id LIMIT ?", (limit,))
    else:
        rows = fetch_all(st, "SELECT * FROM exceptions WHERE status = ? ORDER BY id LIMIT ?", (status, limit))
    return [_item(r) for r in rows]


def get(st: State, item_id: int) -> ExceptionItem | None:
    """Return one item, or ``None``."""
    r = fetch_one(st, "SELECT * FROM exceptions WHERE id = ?", (item_id,))
    return None if r is None else _item(r)


def _set_status(st: State, item_id: int, to: str, from_: tuple[str, ...]) -> bool:
    marks = ", ".join("?" for _ in from_)
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.execute(
            f"UPDATE exceptions SET status = ?, updated_at = ? WHERE id = ? AND status IN ({marks})",
            (to, codec.format_ts(utcnow()), item_id, *from_),
        )
    return cur.rowcount == 1


def mark_retrying(st: State, item_id: int) -> bool:
    """Move an open item to ``retrying``; ``False`` if it was not open."""
    return _set_status(st, item_id, "retrying", ("open",))


def resolve(st: State, item_id: int, *, actor: str, resolution: str) -> bool:
    """Close an unresolved item with who resolved it and how, plus an audit row."""
    now = codec.format_ts(utcnow())
    with st.write_txn():
        with classify_sqlite(st.path):
            cur = st.conn.execute(
                "UPDATE exceptions SET status = 'resolved', resolved_by = ?, resolution = ?,"
                " resolved_at = ?, updated_at = ? WHERE id = ? AND status != 'resolved'",
                (actor, resolution, now, now, item_id),
            )
        if cur.rowcount != 1:
            return False
        item = get(st, item_id)
        assert item is not None
        audit.record(
            st,
            "exception_resolved",
            actor=actor,
            trace_id=item.trace_id,
            entity=item.entity,
            canonical_id=item.canonical_id,
            detail={
                "exception_id": item_id,
                "kind": item.kind,
                "reason": item.reason,
                "resolution": resolution,
            },
        )
    return True


def reopen(st: State, item_id: int, *, actor: str) -> bool:
    """Reopen a resolved item (the fix did not hold), with an audit row."""
    with st.write_txn():
        with classify_sqlite(st.path):
            cur = st.conn.execute(
                "UPDATE exceptions SET status = 'open', resolved_by = NULL, resolution = NULL,"
                " resolved_at = NULL, updated_at = ? WHERE id = ? AND status = 'resolved'",
                (codec.format_ts(utcnow()), item_id),
            )
        if cur.rowcount != 1:
            return False
        audit.record(st, "exception_reopened", actor=actor, detail={"exception_id": item_id})
    return True


def stats(st: State) -> dict[str, ExceptionStats]:
    """Return count and oldest creation time of unresolved items, per reason."""
    rows = fetch_all(
        st,
        "SELECT reason, count(*) AS n, min(created_at) AS oldest FROM exceptions"
        " WHERE status != 'resolved' GROUP BY reason ORDER BY reason",
    )
    return {r["reason"]: ExceptionStats(r["n"], codec.parse_ts(r["oldest"])) for r in rows}


def blocked_on(st: State, blocking_ref_prefix: str) -> list[ExceptionItem]:
    """Return unresolved items whose ``blocking_ref`` starts with the prefix, oldest first."""
    # A range instead of LIKE: no escaping of '%'/'_' and the partial index serves it.
    rows = fetch_all(
        st,
        "SELECT * FROM exceptions WHERE status != 'resolved' AND blocking_ref >= ? AND blocking_ref < ?"
        " ORDER BY id",
        (blocking_ref_prefix, blocking_ref_prefix + "\U0010ffff"),
    )
    return [_item(r) for r in rows]

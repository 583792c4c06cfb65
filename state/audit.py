"""The audit log: an append-only record of decisions and operator actions finance can trust.

Rows are never updated or deleted by syncagent. ``detail`` is a small JSON object of ids,
positions and reasons; callers must not put field values or secrets in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from agent.model import utcnow
from state import codec
from state.db import State, fetch_all


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit row: what was done, by whom, to which record, and why."""

    id: int
    at: datetime
    action: str
    actor: str
    trace_id: str | None
    entity: str | None
    canonical_id: str | None
    detail: Mapping[str, Any]


def record(
    st: State,
    action: str,
    *,
    actor: str = "agent",
    trace_id: str | None = None,
    entity: str | None = None,
    canonical_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    """Append one audit row (e.g. ``ownership_ignored``, ``checkpoint_rewound``); return its id."""
    with st.write_txn():
        cur = st.conn.execute(
            "INSERT INTO audit (at, action, actor, trace_id, entity, canonical_id, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                codec.format_ts(utcnow()),
                action,
                actor,
                trace_id,
                entity,
                canonical_id,
                codec.dumps(detail or {}),
            ),
        )
    return cast(int, cur.lastrowid)


def list_records(
    st: State,
    *,
    action: str | None = None,
    trace_id: str | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Return the newest audit rows first, optionally only one action or one trace."""
    where: list[str] = []
    params: list[Any] = []
    if action is not None:
        where.append("action = ?")
        params.append(action)
    if trace_id is not None:
        where.append("trace_id = ?")
        params.append(trace_id)
    sql = "SELECT * FROM audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    rows = fetch_all(st, sql, (*params, limit))
    return [
        AuditRecord(
            id=r["id"],
            at=codec.parse_ts(r["at"]),
            action=r["action"],
            actor=r["actor"],
            trace_id=r["trace_id"],
            entity=r["entity"],
            canonical_id=r["canonical_id"],
            detail=codec.loads(r["detail"]),
        )
        for r in rows
    ]

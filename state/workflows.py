"""Workflow instances: what triggered each one, the steps it took, its outcome and its latency.

An instance is keyed by ``instance_key``, which the workflow derives from its trigger (the
deal, the change order, the journal entry), so re-resolving the same trigger finds the row
instead of adding one. The first trigger is kept (its journal seq, trace id and source
time): a parked instance released an hour later shows an hour of latency, which is what
happened to the business. Statuses: ``running`` (ops queued), ``parked`` (waiting in the
exception queue), ``failed`` (a target rejected an op), ``completed`` (every op applied),
which is final.

This module also answers the aggregates' question "which records of an entity have this
value in this field" from the shadow table (``related``), through the partial value index.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.model import utcnow
from state import codec
from state.db import State, classify_sqlite, fetch_all, fetch_one
from state.shadow import ShadowValue

STATUSES = ("running", "completed", "parked", "failed")
# The shadow value index only holds short values (see migration m002).
_INDEXED_VALUE_MAX = 80


@dataclass(frozen=True, slots=True)
class WorkflowRow:
    """One workflow instance as stored."""

    id: int
    workflow: str
    key: str
    entity: str
    canonical_id: str
    status: str
    trigger_seq: int | None
    trace_id: str
    trigger: Mapping[str, Any]
    trigger_ts: datetime | None
    steps: tuple[Mapping[str, Any], ...]
    exception_ids: tuple[int, ...]
    detail: str | None
    started_at: datetime
    updated_at: datetime
    completed_at: datetime | None

    @property
    def latency_seconds(self) -> float | None:
        """Seconds from the trigger (its source time) to completion; None until completed."""
        if self.completed_at is None:
            return None
        start = self.trigger_ts or self.started_at
        return max((self.completed_at - start).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Trigger-to-completion latency of one workflow's completed instances, in seconds."""

    count: int
    p50: float
    p95: float
    max: float
    total: float = 0.0


def _row(r: sqlite3.Row) -> WorkflowRow:
    return WorkflowRow(
        id=r["id"],
        workflow=r["workflow"],
        key=r["instance_key"],
        entity=r["entity"],
        canonical_id=r["canonical_id"],
        status=r["status"],
        trigger_seq=r["trigger_seq"],
        trace_id=r["trace_id"],
        trigger=codec.loads(r["trigger"]),
        trigger_ts=codec.parse_ts_or_none(r["trigger_ts"]),
        steps=tuple(codec.loads(r["steps"])),
        exception_ids=tuple(codec.loads(r["exception_ids"])),
        detail=r["detail"],
        started_at=codec.parse_ts(r["started_at"]),
        updated_at=codec.parse_ts(r["updated_at"]),
        completed_at=codec.parse_ts_or_none(r["completed_at"]),
    )


def get(st: State, key: str) -> WorkflowRow | None:
    """Return the instance with ``key``, or None."""
    r = fetch_one(st, "SELECT * FROM workflow_instances WHERE instance_key = ?", (key,))
    return None if r is None else _row(r)


def status_of(st: State, key: str) -> str | None:
    """Return the status of the instance with ``key``, or None if there is none."""
    r = fetch_one(st, "SELECT status FROM workflow_instances WHERE instance_key = ?", (key,))
    return None if r is None else str(r["status"])


def record(
    st: State,
    *,
    workflow: str,
    key: str,
    entity: str,
    canonical_id: str,
    status: str,
    trigger_seq: int | None,
    trace_id: str,
    trigger: Mapping[str, Any],
    trigger_ts: datetime | None,
    steps: Sequence[str] = (),
    detail: str | None = None,
) -> WorkflowRow:
    """Start an instance, or move an existing one to ``status`` and append ``steps``.

    The first trigger (seq, trace id, change, source time) stays. A completed instance
    stays completed whatever is recorded later.

    Raises:
        ValueError: ``status`` is not one of ``STATUSES``.
    """
    if status not in STATUSES:
        raise ValueError(f"unknown workflow status {status!r}")
    now = utcnow()
    ts = codec.format_ts(now)
    done = [{"step": s, "at": now.isoformat()} for s in steps]
    with st.write_txn(), classify_sqlite(st.path):
        existing = get(st, key)
        if existing is None:
            st.conn.execute(
                "INSERT INTO workflow_instances (workflow, instance_key, entity, canonical_id,"
                " trigger_seq, trace_id, status, trigger, trigger_ts, steps, detail, started_at,"
                " updated_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    workflow,
                    key,
                    entity,
                    canonical_id,
                    trigger_seq,
                    trace_id,
                    status,
                    codec.dumps(trigger),
                    codec.format_ts_or_none(trigger_ts),
                    codec.dumps(done),
                    detail,
                    ts,
                    ts,
                    ts if status == "completed" else None,
                ),
            )
        elif existing.status != "completed":
            # Re-evaluating a parked instance repeats its steps: keep one of each in a row.
            last = existing.steps[-1]["step"] if existing.steps else None
            done = [d for d in done if d["step"] != last]
            st.conn.execute(
                "UPDATE workflow_instances SET status = ?, steps = ?, detail = ?, updated_at = ?,"
                " completed_at = ? WHERE instance_key = ?",
                (
                    status,
                    codec.dumps([*existing.steps, *done]),
                    detail,
                    ts,
                    ts if status == "completed" else None,
                    key,
                ),
            )
        found = get(st, key)
    assert found is not None
    return found


def mark_step(
    st: State, key: str, step: str, *, detail: Mapping[str, Any] | None = None, completed: bool = False
) -> bool:
    """Append a step done (with its time); with ``completed``, finish the instance. False if unknown."""
    now = utcnow()
    ts = codec.format_ts(now)
    with st.write_txn(), classify_sqlite(st.path):
        existing = get(st, key)
        if existing is None:
            return False
        steps = [*existing.steps, {"step": step, "at": now.isoformat(), **(detail or {})}]
        if existing.status == "completed" or not completed:
            status = existing.status if existing.status in ("completed", "running") else "running"
            st.conn.execute(
                "UPDATE workflow_instances SET steps = ?, status = ?, updated_at = ? WHERE instance_key = ?",
                (codec.dumps(steps), status, ts, key),
            )
        else:
            st.conn.execute(
                "UPDATE workflow_instances SET steps = ?, status = 'completed', updated_at = ?,"
                " completed_at = ? WHERE instance_key = ?",
                (codec.dumps(steps), ts, ts, key),
            )
    return True


def mark_failed(st: State, key: str, reason: str) -> bool:
    """Mark a running instance failed (a target rejected one of its ops); False if not running."""
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.execute(
            "UPDATE workflow_instances SET status = 'failed', detail = ?, updated_at = ?"
            " WHERE instance_key = ? AND status = 'running'",
            (reason[:2000], codec.format_ts(utcnow()), key),
        )
    return cur.rowcount == 1


def note_exceptions(st: State, key: str, ids: Sequence[int]) -> None:
    """Remember the exception items opened for the instance (so they close when it proceeds)."""
    if not ids:
        return
    with st.write_txn(), classify_sqlite(st.path):
        existing = get(st, key)
        if existing is None:
            return
        merged = sorted({*existing.exception_ids, *ids})
        st.conn.execute(
            "UPDATE workflow_instances SET exception_ids = ? WHERE instance_key = ?",
            (codec.dumps(merged), key),
        )


def take_exceptions(st: State, key: str) -> list[int]:
    """Return the instance's remembered exception items and forget them."""
    with st.write_txn(), classify_sqlite(st.path):
        existing = get(st, key)
        if existing is None or not existing.exception_ids:
            return []
        st.conn.execute("UPDATE workflow_instances SET exception_ids = '[]' WHERE instance_key = ?", (key,))
    return list(existing.exception_ids)


def parked_on(st: State, journal_seq: int) -> list[WorkflowRow]:
    """Return the parked instances whose trigger is journal entry ``journal_seq``."""
    rows = fetch_all(
        st,
        "SELECT * FROM workflow_instances WHERE trigger_seq = ? AND status = 'parked' ORDER BY id",
        (journal_seq,),
    )
    return [_row(r) for r in rows]


def list_instances(
    st: State, *, workflow: str | None = None, status: str | None = None, limit: int = 100
) -> list[WorkflowRow]:
    """Return the newest instances first, optionally of one workflow and one status."""
    where, params = [], []
    if workflow is not None:
        where.append("workflow = ?")
        params.append(workflow)
    if status is not None:
        where.append("status = ?")
        params.append(status)
    sql = "SELECT * FROM workflow_instances"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = fetch_all(st, sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
    return [_row(r) for r in rows]


def latency(st: State, *, workflow: str | None = None) -> dict[str, LatencyStats]:
    """Return trigger-to-completion latency figures per workflow, over completed instances."""
    sql = (
        "SELECT workflow, trigger_ts, started_at, completed_at FROM workflow_instances"
        " WHERE status = 'completed'"
    )
    params: tuple[object, ...] = ()
    if workflow is not None:
        sql += " AND workflow = ?"
        params = (workflow,)
    values: dict[str, list[float]] = {}
    for r in fetch_all(st, sql, params):
        start = codec.parse_ts(r["trigger_ts"] or r["started_at"])
        seconds = (codec.parse_ts(r["completed_at"]) - start).total_seconds()
        values.setdefault(r["workflow"], []).append(max(seconds, 0.0))
    return {name: _stats(v) for name, v in sorted(values.items())}


def _stats(values: list[float]) -> LatencyStats:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return LatencyStats(len(ordered), pick(0.5), pick(0.95), ordered[-1], sum(ordered))


def related(st: State, entity: str, system: str, field: str, value: Any) -> dict[str, dict[str, ShadowValue]]:
    """Return ``{canonical_id: {field: ShadowValue}}`` of ``entity``'s records in ``system``
    whose shadow ``field`` equals ``value`` (e.g. every invoice of one contract)."""
    text = codec.dumps(value)
    match = "entity = ? AND system = ? AND field = ? AND value = ?"
    if len(text) <= _INDEXED_VALUE_MAX:
        match += f" AND length(value) <= {_INDEXED_VALUE_MAX}"
    rows = fetch_all(
        st,
        "SELECT * FROM shadow WHERE entity = ? AND system = ? AND canonical_id IN"
        f" (SELECT canonical_id FROM shadow WHERE {match}) ORDER BY canonical_id",
        (entity, system, entity, system, field, text),
    )
    out: dict[str, dict[str, ShadowValue]] = {}
    for r in rows:
        out.setdefault(r["canonical_id"], {})[r["field"]] = ShadowValue(
            value=codec.loads(r["value"]),
            system=r["system"],
            written_by_agent=bool(r["written_by_agent"]),
            source_ts=codec.parse_ts_or_none(r["source_ts"]),
            updated_at=codec.parse_ts(r["updated_at"]),
        )
    return out

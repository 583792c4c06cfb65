"""The shadow: the last value the agent saw in, or wrote to, each system, per field and record.

It is the comparison base for ownership, conflicts and echo suppression: a change from a
system whose value equals that system's shadow is nothing new (often the agent's own write
coming back). Each system has its own slot per field, so "changed on both sides since the
last sync" can be told apart from "one side caught up". Values are stored as JSON and come
back as plain JSON types (see ``state.codec``); a stored ``None`` is a known NULL, an absent
field is unknown.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.model import utcnow
from state import codec
from state.db import State, classify_sqlite, fetch_all

_UPSERT = (
    "INSERT INTO shadow (entity, canonical_id, system, field, value, written_by_agent,"
    " source_ts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (entity, canonical_id, system, field) DO UPDATE SET value = excluded.value,"
    " written_by_agent = excluded.written_by_agent, source_ts = excluded.source_ts,"
    " updated_at = excluded.updated_at"
)


@dataclass(frozen=True, slots=True)
class ShadowValue:
    """One field's last known value in one system, whether the agent wrote it, and when."""

    value: Any
    system: str
    written_by_agent: bool
    source_ts: datetime | None
    updated_at: datetime


def _value(r: sqlite3.Row) -> ShadowValue:
    return ShadowValue(
        value=codec.loads(r["value"]),
        system=r["system"],
        written_by_agent=bool(r["written_by_agent"]),
        source_ts=codec.parse_ts_or_none(r["source_ts"]),
        updated_at=codec.parse_ts(r["updated_at"]),
    )


def get(st: State, entity: str, canonical_id: str, system: str | None = None) -> dict[str, ShadowValue]:
    """Return ``{field: ShadowValue}`` for one record: in ``system``, or the latest in any system.

    Without ``system``, each field's most recently recorded value wins, whichever system it
    was seen in or written to. Empty if the record was never seen.
    """
    if system is not None:
        rows = fetch_all(
            st,
            "SELECT * FROM shadow WHERE entity = ? AND canonical_id = ? AND system = ?",
            (entity, canonical_id, system),
        )
        return {r["field"]: _value(r) for r in rows}
    rows = fetch_all(
        st,
        "SELECT * FROM shadow WHERE entity = ? AND canonical_id = ? ORDER BY updated_at, rowid",
        (entity, canonical_id),
    )
    # Ordered oldest first, so the newest value of each field is the one left standing.
    return {r["field"]: _value(r) for r in rows}


def put(
    st: State,
    entity: str,
    canonical_id: str,
    values: Mapping[str, object],
    *,
    system: str,
    by_agent: bool,
    source_ts: datetime | None,
) -> None:
    """Record ``values`` as the fields' latest known values in ``system``, replacing earlier ones."""
    if not values:
        return
    now = codec.format_ts(utcnow())
    ts = codec.format_ts_or_none(source_ts)
    flag = 1 if by_agent else 0
    rows = [
        (entity, canonical_id, system, name, codec.dumps(value), flag, ts, now)
        for name, value in values.items()
    ]
    with st.write_txn(), classify_sqlite(st.path):
        st.conn.executemany(_UPSERT, rows)


def forget(st: State, entity: str, canonical_id: str) -> int:
    """Drop every shadow field of one record in every system (after a delete); return how many."""
    with st.write_txn(), classify_sqlite(st.path):
        cur = st.conn.execute(
            "DELETE FROM shadow WHERE entity = ? AND canonical_id = ?", (entity, canonical_id)
        )
    return cur.rowcount

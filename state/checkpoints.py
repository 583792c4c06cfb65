"""Checkpoints: one cursor per (owner, stream), with a generation and a history of every move.

Owners are e.g. ``"source:erp"`` (stream ``"wal"``), ``"source:crm"`` (stream ``"Account"``)
and ``"resolver"`` (stream ``"journal"``). Cursors are connector-owned JSON and stored
verbatim. ``advance`` keeps the generation; ``rewind`` bumps it, so a running agent that
read generation N notices an operator's rewind: its next ``advance(..., expected_generation=N)``
returns ``None`` and writes nothing, instead of overwriting the rewound position.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import datetime

from agent.model import Cursor, utcnow
from state import audit, codec
from state.db import State, fetch_all, fetch_one

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where one owner's stream stands: its cursor, generation and last move."""

    owner: str
    stream: str
    cursor: Cursor
    generation: int
    updated_at: datetime
    reason: str
    actor: str


@dataclass(frozen=True, slots=True)
class CheckpointMove:
    """One move of a checkpoint: from ``previous`` (``None`` when created) to ``cursor``."""

    id: int
    owner: str
    stream: str
    previous: Cursor | None
    cursor: Cursor
    generation: int
    reason: str
    actor: str
    at: datetime


def _checkpoint(r: sqlite3.Row) -> Checkpoint:
    return Checkpoint(
        owner=r["owner"],
        stream=r["stream"],
        cursor=Cursor(codec.loads(r["cursor"])),
        generation=r["generation"],
        updated_at=codec.parse_ts(r["updated_at"]),
        reason=r["reason"],
        actor=r["actor"],
    )


def get(st: State, owner: str, stream: str) -> Checkpoint | None:
    """Return the checkpoint of ``(owner, stream)``, or ``None`` if it never moved."""
    row = fetch_one(st, "SELECT * FROM checkpoints WHERE owner = ? AND stream = ?", (owner, stream))
    return None if row is None else _checkpoint(row)


def list_all(st: State) -> list[Checkpoint]:
    """Return every checkpoint, ordered by owner and stream."""
    return [_checkpoint(r) for r in fetch_all(st, "SELECT * FROM checkpoints ORDER BY owner, stream")]


def _move(
    st: State,
    owner: str,
    stream: str,
    previous: str | None,
    cursor_text: str,
    generation: int,
    reason: str,
    actor: str,
) -> Checkpoint:
    now = codec.format_ts(utcnow())
    st.conn.execute(
        "INSERT INTO checkpoints (owner, stream, cursor, generation, updated_at, reason, actor)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (owner, stream) DO UPDATE SET cursor = excluded.cursor,"
        " generation = excluded.generation, updated_at = excluded.updated_at,"
        " reason = excluded.reason, actor = excluded.actor",
        (owner, stream, cursor_text, generation, now, reason, actor),
    )
    st.conn.execute(
        "INSERT INTO checkpoint_history"
        " (owner, stream, previous, cursor, generation, reason, actor, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (owner, stream, previous, cursor_text, generation, reason, actor, now),
    )
    return Checkpoint(
        owner, stream, Cursor(codec.loads(cursor_text)), generation, codec.parse_ts(now), reason, actor
    )


def advance(
    st: State,
    owner: str,
    stream: str,
    cursor: Cursor,
    *,
    reason: str = "advance",
    actor: str = "agent",
    expected_generation: int | None = None,
) -> Checkpoint | None:
    """Move a checkpoint forward within its generation (creating it at generation 1).

    With ``expected_generation`` (a missing row counts as generation 0), the move happens only
    if the stored generation still equals it; otherwise nothing is written and ``None`` is
    returned, so a caller whose position was rewound underneath it notices and re-reads. An
    unchanged cursor writes nothing and returns the stored checkpoint.
    """
    text = codec.dumps(cursor.data)
    with st.write_txn():
        row = fetch_one(
            st,
            "SELECT cursor, generation FROM checkpoints WHERE owner = ? AND stream = ?",
            (owner, stream),
        )
        stored_generation = 0 if row is None else row["generation"]
        if expected_generation is not None and expected_generation != stored_generation:
            logger.info(
                "event=checkpoint_advance_skipped owner=%s stream=%s expected_generation=%s generation=%s",
                owner,
                stream,
                expected_generation,
                stored_generation,
            )
            return None
        if row is None:
            return _move(st, owner, stream, None, text, 1, reason, actor)
        if row["cursor"] == text:
            return get(st, owner, stream)
        return _move(st, owner, stream, row["cursor"], text, stored_generation, reason, actor)


def rewind(st: State, owner: str, stream: str, cursor: Cursor, *, reason: str, actor: str) -> Checkpoint:
    """Set a checkpoint to ``cursor`` in a new generation, with a history row and an audit row."""
    text = codec.dumps(cursor.data)
    with st.write_txn():
        row = fetch_one(
            st,
            "SELECT cursor, generation FROM checkpoints WHERE owner = ? AND stream = ?",
            (owner, stream),
        )
        previous = None if row is None else row["cursor"]
        generation = 1 if row is None else row["generation"] + 1
        moved = _move(st, owner, stream, previous, text, generation, reason, actor)
        audit.record(
            st,
            "checkpoint_rewound",
            actor=actor,
            detail={
                "owner": owner,
                "stream": stream,
                "previous": None if previous is None else codec.loads(previous),
                "cursor": cursor.data,
                "generation": generation,
                "reason": reason,
            },
        )
    logger.info(
        "event=checkpoint_rewound owner=%s stream=%s generation=%s actor=%s",
        owner,
        stream,
        generation,
        actor,
    )
    return moved


def history(
    st: State, owner: str | None = None, stream: str | None = None, limit: int = 50
) -> list[CheckpointMove]:
    """Return the newest checkpoint moves first, optionally for one owner and/or stream."""
    where: list[str] = []
    params: list[object] = []
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    if stream is not None:
        where.append("stream = ?")
        params.append(stream)
    sql = "SELECT * FROM checkpoint_history"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    return [
        CheckpointMove(
            id=r["id"],
            owner=r["owner"],
            stream=r["stream"],
            previous=None if r["previous"] is None else Cursor(codec.loads(r["previous"])),
            cursor=Cursor(codec.loads(r["cursor"])),
            generation=r["generation"],
            reason=r["reason"],
            actor=r["actor"],
            at=codec.parse_ts(r["at"]),
        )
        for r in fetch_all(st, sql, (*params, limit))
    ]


def prune_history(st: State, older_than: datetime) -> int:
    """Delete history rows older than ``older_than``; return how many (rewinds stay in audit)."""
    with st.write_txn():
        cur = st.conn.execute("DELETE FROM checkpoint_history WHERE at < ?", (codec.format_ts(older_than),))
    return cur.rowcount

"""Connector health: per (connector, stream), its state, last success or error, and gauges.

Written by the scheduler's job wrapper and the capture/deliver stages; read by ``status``
(possibly from another process, read-only) and the metrics endpoint.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.model import utcnow
from state import codec
from state.db import State, classify_sqlite, fetch_all

HealthState = Literal["ok", "error", "stopped", "deferred"]

_ERROR_MAX = 2000


@dataclass(frozen=True, slots=True)
class ConnectorHealth:
    """What ``status`` shows for one connector stream."""

    connector: str
    stream: str
    state: str
    last_success_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    changes_total: int
    lag_bytes: int | None
    oldest_unconsumed_at: datetime | None
    detail: Mapping[str, Any] | None
    updated_at: datetime


def record_success(
    st: State,
    connector: str,
    stream: str,
    *,
    changes: int,
    lag_bytes: int | None = None,
    oldest_unconsumed_at: datetime | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Mark a stream ``ok`` after a successful run and add ``changes`` to its total.

    Gauges left as ``None`` keep their previous value.
    """
    now = codec.format_ts(utcnow())
    with st.write_txn(), classify_sqlite(st.path):
        st.conn.execute(
            "INSERT INTO connector_health (connector, stream, state, last_success_at,"
            " changes_total, lag_bytes, oldest_unconsumed_at, detail, updated_at)"
            " VALUES (?, ?, 'ok', ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (connector, stream) DO UPDATE SET state = 'ok',"
            " last_success_at = excluded.last_success_at,"
            " changes_total = changes_total + excluded.changes_total,"
            " lag_bytes = coalesce(excluded.lag_bytes, lag_bytes),"
            " oldest_unconsumed_at = coalesce(excluded.oldest_unconsumed_at, oldest_unconsumed_at),"
            " detail = coalesce(excluded.detail, detail), updated_at = excluded.updated_at",
            (
                connector,
                stream,
                now,
                changes,
                lag_bytes,
                codec.format_ts_or_none(oldest_unconsumed_at),
                None if detail is None else codec.dumps(detail),
                now,
            ),
        )


def record_error(st: State, connector: str, stream: str, *, error: str, state: HealthState = "error") -> None:
    """Record a failed run: the error text (no secrets, no field values) and the new state."""
    now = codec.format_ts(utcnow())
    with st.write_txn(), classify_sqlite(st.path):
        st.conn.execute(
            "INSERT INTO connector_health (connector, stream, state, last_error, last_error_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (connector, stream) DO UPDATE SET state = excluded.state,"
            " last_error = excluded.last_error, last_error_at = excluded.last_error_at,"
            " updated_at = excluded.updated_at",
            (connector, stream, state, error[:_ERROR_MAX], now, now),
        )


def set_gauges(
    st: State,
    connector: str,
    stream: str,
    *,
    lag_bytes: int | None = None,
    oldest_unconsumed_at: datetime | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Replace a stream's gauges (slot lag, oldest unconsumed change, detail); keep its state.

    Unlike ``record_success``, ``None`` here means "none now" (an empty backlog clears the
    oldest-unconsumed time). A stream seen for the first time starts ``ok`` with no success yet.
    """
    now = codec.format_ts(utcnow())
    with st.write_txn(), classify_sqlite(st.path):
        st.conn.execute(
            "INSERT INTO connector_health (connector, stream, state, lag_bytes,"
            " oldest_unconsumed_at, detail, updated_at) VALUES (?, ?, 'ok', ?, ?, ?, ?)"
            " ON CONFLICT (connector, stream) DO UPDATE SET lag_bytes = excluded.lag_bytes,"
            " oldest_unconsumed_at = excluded.oldest_unconsumed_at, detail = excluded.detail,"
            " updated_at = excluded.updated_at",
            (
                connector,
                stream,
                lag_bytes,
                codec.format_ts_or_none(oldest_unconsumed_at),
                None if detail is None else codec.dumps(detail),
                now,
            ),
        )


def _health(r: sqlite3.Row) -> ConnectorHealth:
    return ConnectorHealth(
        connector=r["connector"],
        stream=r["stream"],
        state=r["state"],
        last_success_at=codec.parse_ts_or_none(r["last_success_at"]),
        last_error=r["last_error"],
        last_error_at=codec.parse_ts_or_none(r["last_error_at"]),
        changes_total=r["changes_total"],
        lag_bytes=r["lag_bytes"],
        oldest_unconsumed_at=codec.parse_ts_or_none(r["oldest_unconsumed_at"]),
        detail=None if r["detail"] is None else codec.loads(r["detail"]),
        updated_at=codec.parse_ts(r["updated_at"]),
    )


def all_health(st: State) -> list[ConnectorHealth]:
    """Return every connector stream's health, ordered by connector and stream."""
    return [_health(r) for r in fetch_all(st, "SELECT * FROM connector_health ORDER BY connector, stream")]

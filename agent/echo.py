"""Decide whether a captured change is the agent's own write coming back.

Two signals, never a timing window: the PostgreSQL replication origin the agent's
writer sessions set up (pgoutput's Origin message), and, for APIs, values equal to the
shadow: what the agent last wrote to or saw in that system.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from agent.decision import SeenValue
from agent.model import Change


def is_origin_echo(change: Change, own_origins: frozenset[str]) -> bool:
    """True when the change was written in a session tagged with one of our origins."""
    return change.origin is not None and change.origin in own_origins


def changed_fields(canonical: Mapping[str, Any], shadow: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields whose value differs from what the agent last saw in that system."""
    return {k: v for k, v in canonical.items() if k not in shadow or shadow[k] != v}


def without_stale(
    canonical: Mapping[str, Any],
    seen: Mapping[str, SeenValue],
    change_ts: datetime | None,
    captured_at: datetime | None = None,
) -> dict[str, Any]:
    """Drop the fields whose shadow in the source system is newer than the change's image.

    A database row image carries every column as it was at its commit: captured after the
    agent wrote a newer value to that row, its older columns are history, not edits. Both
    stamps come from the source system's own clock (its commit time, and the sink's reading
    taken after its write), so they compare without skew. Where the system gave the agent's
    write no time (the APIs), an image read before the agent recorded that write is as old:
    both times are then the agent's own.
    """
    return {k: v for k, v in canonical.items() if not _older(seen.get(k), change_ts, captured_at)}


def _older(s: SeenValue | None, change_ts: datetime | None, captured_at: datetime | None) -> bool:
    if s is None:
        return False
    if s.source_ts is not None:
        return change_ts is not None and change_ts < s.source_ts
    return s.written_at is not None and captured_at is not None and captured_at < s.written_at

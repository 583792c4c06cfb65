"""Decide whether a captured change is the agent's own write coming back.

Two signals, never a timing window: the PostgreSQL replication origin the agent's
writer sessions set up (pgoutput's Origin message), and, for APIs, values equal to the
shadow: what the agent last wrote to or saw in that system.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.model import Change


def is_origin_echo(change: Change, own_origins: frozenset[str]) -> bool:
    """True when the change was written in a session tagged with one of our origins."""
    return change.origin is not None and change.origin in own_origins


def changed_fields(canonical: Mapping[str, Any], shadow: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical fields whose value differs from what the agent last saw in that system."""
    return {k: v for k, v in canonical.items() if k not in shadow or shadow[k] != v}

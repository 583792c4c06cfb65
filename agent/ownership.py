"""Field-level ownership: which system may change a field, and what happens otherwise.

A field flows only from its owner. A non-owner's edit is ignored (audited), reverted
(the owner's value is pushed back) or queued for a person, by the entity's policy. A
``shared`` field changed on both sides since the last sync is a conflict, won by the
latest source timestamp or by a named system.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from agent.config import SHARED, EntityConfig, FieldRule

Verdict = Literal["propagate", "ignore", "revert", "exception", "conflict_won", "conflict_lost"]


@dataclass(frozen=True, slots=True)
class FieldDecision:
    """The verdict for one changed field of one change."""

    field: str
    verdict: Verdict
    reason: str


def decide(
    entity: EntityConfig,
    rule: FieldRule,
    *,
    source: str,
    other_changed: bool,
    source_ts: datetime | None,
    other_ts: datetime | None,
) -> FieldDecision:
    """Decide what a change of ``rule`` coming from ``source`` does.

    ``other_changed`` says whether another system holds an unsynced different value for
    the field (its own edit since the last sync); it matters only for shared fields.
    """
    if rule.owner == source:
        return FieldDecision(rule.name, "propagate", "owner")
    if rule.owner != SHARED:
        policy = entity.on_non_owner_edit
        verdict: Verdict = "ignore" if policy == "ignore" else "revert" if policy == "revert" else "exception"
        return FieldDecision(rule.name, verdict, f"owned by {rule.owner}")
    if not other_changed:
        return FieldDecision(rule.name, "propagate", "shared")
    if entity.on_conflict == "latest":
        if source_ts is None or other_ts is None:
            won = other_ts is None
        else:
            won = source_ts >= other_ts
        why = "latest source timestamp"
    else:
        won = entity.on_conflict == source
        why = f"{entity.on_conflict} wins"
    return FieldDecision(rule.name, "conflict_won" if won else "conflict_lost", why)

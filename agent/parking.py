"""Parking a change: one exception item per problem a decision found, with the change's record."""

from __future__ import annotations

from agent.decision import ProblemItem
from agent.model import Change
from state import exceptions
from state.db import State


def open_problem(
    st: State,
    p: ProblemItem,
    change: Change,
    *,
    trace_id: str,
    entity: str | None,
    canonical_id: str | None,
    journal_seq: int | None,
) -> int:
    """Open (or bump) the exception item for ``p``, carrying the change's object, key and fields."""
    return exceptions.open_item(
        st,
        kind=p.kind,
        reason=p.reason,
        detail=p.detail,
        trace_id=trace_id,
        source=change.source,
        entity=entity,
        canonical_id=canonical_id,
        record={"object": change.object_name, "key": dict(change.key), "fields": dict(change.fields)},
        field=p.field,
        journal_seq=journal_seq,
        blocking_ref=p.blocking_ref,
    )

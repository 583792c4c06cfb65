"""The resolver's read-only view of state, inside the resolve transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.decision import SeenValue
from state import outbox, shadow, workflows, xref
from state.db import State


class StoreView:
    """The resolver's read-only view of state, inside the resolve transaction."""

    def __init__(self, st: State) -> None:
        self.st = st

    def canonical_id(self, entity: str, system: str, external_id: str) -> str | None:
        """The canonical id linked to a system's record, if any."""
        return xref.lookup(self.st, entity, system, external_id)

    def external_id(self, entity: str, canonical_id: str, system: str) -> str | None:
        """The id of the canonical record in ``system``, if linked."""
        return xref.external_id(self.st, entity, canonical_id, system)

    def shadow(self, entity: str, canonical_id: str, system: str) -> Mapping[str, SeenValue]:
        """Last values the agent saw in, or wrote to, ``system``."""
        return {
            k: SeenValue(
                v.value,
                v.source_ts,
                v.updated_at if v.written_by_agent and v.source_ts is None else None,
            )
            for k, v in shadow.get(self.st, entity, canonical_id, system).items()
        }

    def find_natural(self, entity: str, field: str, value: Any) -> str | None:
        """The canonical id of a record whose natural key ``field`` equals ``value``."""
        return xref.find_natural(self.st, entity, field, value)

    def new_canonical_id(self) -> str:
        """Mint a canonical id."""
        return xref.new_canonical_id()

    def pending_fields(self, entity: str, canonical_id: str, system: str) -> frozenset[str]:
        """Canonical fields that queued, undelivered ops will write to ``system``."""
        return frozenset(self.queued_values(entity, canonical_id, system))

    def related(
        self, entity: str, system: str, field: str, value: Any
    ) -> Mapping[str, Mapping[str, SeenValue]]:
        """Shadows in ``system`` of the ``entity`` records whose ``field`` equals ``value``."""
        return {
            cid: {k: SeenValue(v.value, v.source_ts) for k, v in fields.items()}
            for cid, fields in workflows.related(self.st, entity, system, field, value).items()
        }

    def pending_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Any]:
        """The canonical values queued, undelivered ops will write to ``system`` (latest wins)."""
        return {k: v[-1] for k, v in self.queued_values(entity, canonical_id, system).items()}

    def queued_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Sequence[Any]]:
        """Every canonical value queued, undelivered ops will write to ``system``, oldest first."""
        pending = outbox.pending_for(self.st, entity, canonical_id)
        return outbox.values_by_field(op.canonical for op in pending if op.target == system)

    def late_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Sequence[Any]]:
        """Values the agent wrote to ``system`` whose earlier, unanswered attempt may still land."""
        return outbox.late_values(self.st, entity, canonical_id, system)

    def workflow_status(self, instance_key: str) -> str | None:
        """The status of a workflow instance, or None."""
        return workflows.status_of(self.st, instance_key)

"""What resolving a change produces, and the read-only view of state the resolver works on.

Kept apart from ``agent.resolve`` so that the workflows, which produce the same kinds of
items, depend on these values and not on the resolver itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from agent.model import Op

if TYPE_CHECKING:
    from agent.workflows.base import WorkflowInstance


@dataclass(frozen=True, slots=True)
class SeenValue:
    """A shadow entry as the resolver needs it: the value and when its system changed it.

    ``written_at``: for a value the agent wrote and its system gave no time of its own for,
    when the agent recorded that write (its own clock), else None.
    """

    value: Any
    source_ts: datetime | None
    written_at: datetime | None = None


class StateView(Protocol):
    """What the resolver may ask of state (read-only)."""

    def canonical_id(self, entity: str, system: str, external_id: str) -> str | None:
        """The canonical id linked to a system's record, if any."""
        ...

    def external_id(self, entity: str, canonical_id: str, system: str) -> str | None:
        """The id of the canonical record in ``system``, if linked."""
        ...

    def shadow(self, entity: str, canonical_id: str, system: str) -> Mapping[str, SeenValue]:
        """Last values the agent saw in, or wrote to, ``system`` for this record."""
        ...

    def find_natural(self, entity: str, field: str, value: Any) -> str | None:
        """The canonical id of a record of ``entity`` whose natural key ``field`` equals ``value``."""
        ...

    def new_canonical_id(self) -> str:
        """Mint a canonical id."""
        ...

    def pending_fields(self, entity: str, canonical_id: str, system: str) -> frozenset[str]:
        """Canonical fields that queued, undelivered ops will write to ``system``."""
        ...

    def related(
        self, entity: str, system: str, field: str, value: Any
    ) -> Mapping[str, Mapping[str, SeenValue]]:
        """Shadows in ``system`` of the records of ``entity`` whose ``field`` equals ``value``."""
        ...

    def pending_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Any]:
        """The canonical values queued, undelivered ops will write to ``system`` (latest wins)."""
        ...

    def queued_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Sequence[Any]]:
        """Every canonical value queued, undelivered ops will write to ``system``, oldest first."""
        ...

    def late_values(self, entity: str, canonical_id: str, system: str) -> Mapping[str, Sequence[Any]]:
        """Values the agent wrote to ``system`` whose earlier, unanswered attempt may still land."""
        ...

    def workflow_status(self, instance_key: str) -> str | None:
        """The status of a workflow instance (running, parked, failed, completed), or None."""
        ...


@dataclass(frozen=True, slots=True)
class ProblemItem:
    """An exception-queue item the decision opens (``instance_key``: a workflow instance it parks)."""

    kind: str
    reason: str
    detail: str
    field: str | None = None
    blocking_ref: str | None = None
    instance_key: str | None = None


@dataclass(frozen=True, slots=True)
class AuditItem:
    """An audit row the decision writes."""

    action: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything resolving one change produced; applied atomically by the pipeline."""

    fate: str
    detail: str | None = None
    entity: str | None = None
    canonical_id: str | None = None
    link: tuple[str, str] | None = None
    seen: Mapping[str, Any] = field(default_factory=dict)
    natural: tuple[tuple[str, Any], ...] = ()
    ops: tuple[Op, ...] = ()
    problems: tuple[ProblemItem, ...] = ()
    audits: tuple[AuditItem, ...] = ()
    instances: tuple[WorkflowInstance, ...] = ()

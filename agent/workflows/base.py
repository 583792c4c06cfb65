"""What a workflow is, what it sees and what it returns; the set of configured workflows.

A workflow is an object with a ``name``, the first copies it ``claims`` (entity, system:
the generic sync leaves those to it) and ``evaluate(ctx)``, which returns ``None`` when the
change does not trigger it, or a ``WorkflowResult``: ops for the outbox, problems for the
exception queue (typed reason, the missing reference named in ``blocking_ref``), audit rows
and the instance record. Evaluation is pure, like the resolver: everything it knows of
state comes through ``ctx.view``. Instances are keyed by their trigger and every op's
idempotency key is too, so resolving the same trigger again creates nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from agent.config import Config, EntityConfig
from agent.mapping import datetime_text, decimal_text
from agent.model import Change, JournalEntry, Op
from agent.resolve import AuditItem, Decision, ProblemItem, Resolver, SeenValue, StateView

RUNNING, COMPLETED, PARKED, FAILED = "running", "completed", "parked", "failed"


@dataclass(frozen=True, slots=True)
class WorkflowContext:
    """One change as a workflow sees it: the record as now known in its source, and what moved.

    ``record_id`` is the record's id in ``system``. ``record`` is its shadow there with
    this change laid over it (a change
    older than a shadow value does not roll that value back); ``changed`` holds the fields
    this change altered and ``previous`` their values before it.
    """

    config: Config
    entity: EntityConfig
    canonical_id: str
    system: str
    record_id: str
    record: Mapping[str, Any]
    changed: Mapping[str, Any]
    previous: Mapping[str, Any]
    change: Change
    seq: int
    view: StateView
    new: bool = False


@dataclass(frozen=True, slots=True)
class WorkflowInstance:
    """The instance record a result carries: which workflow, keyed how, and how far it got."""

    workflow: str
    key: str
    entity: str
    canonical_id: str
    status: str
    steps: tuple[str, ...] = ()
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class WorkflowResult:
    """What one triggered workflow produced for one change."""

    instance: WorkflowInstance
    ops: tuple[Op, ...] = ()
    problems: tuple[ProblemItem, ...] = ()
    audits: tuple[AuditItem, ...] = ()


class Workflow(Protocol):
    """A business workflow run on every resolved change."""

    name: str

    def claims(self) -> frozenset[tuple[str, str]]:
        """(entity, system) pairs whose first copy only this workflow creates."""
        ...

    def evaluate(self, ctx: WorkflowContext) -> WorkflowResult | None:
        """The workflow's result for this change, or None when the change does not trigger it."""
        ...


class WorkflowSet:
    """The configured workflows, run together on each change by the resolver."""

    def __init__(self, workflows: Sequence[Workflow]) -> None:
        self.workflows = tuple(workflows)
        self.claims = frozenset(c for w in self.workflows for c in w.claims())

    def __len__(self) -> int:
        return len(self.workflows)

    def names(self) -> list[str]:
        """The names of the workflows, in the order they run."""
        return [w.name for w in self.workflows]

    def run(
        self,
        config: Config,
        entity: EntityConfig,
        canonical_id: str,
        record_id: str,
        record: Mapping[str, Any],
        changed: Mapping[str, Any],
        previous: Mapping[str, Any],
        entry: JournalEntry,
        view: StateView,
        *,
        new: bool,
    ) -> list[WorkflowResult]:
        """Every triggered workflow's result for one journaled change."""
        c = entry.change
        ctx = WorkflowContext(
            config,
            entity,
            canonical_id,
            c.source,
            record_id,
            record,
            changed,
            previous,
            c,
            entry.seq,
            view,
            new,
        )
        return [r for w in self.workflows if (r := w.evaluate(ctx)) is not None]

    def reevaluate(self, resolver: Resolver, entry: JournalEntry, view: StateView) -> Decision:
        """Run the workflows again on the record as known now (the retry of a parked instance).

        Nothing is mapped, linked or written to the shadow: an old change cannot roll the
        record back to its old values, as resolving the whole change again could.
        """
        c = entry.change
        entity = resolver.entity_for(c.source, c.object_name)
        if entity is None:
            return Decision("skipped", "object not mapped")
        m = entity.systems[c.source]
        rid = c.key.get(m.key, c.fields.get(m.key))
        cid = view.canonical_id(entity.name, c.source, str(rid)) if rid is not None else None
        if cid is None:
            return Decision("noop", "record not linked", entity=entity.name)
        record = {k: v.value for k, v in view.shadow(entity.name, cid, c.source).items()}
        flows = self.run(resolver.config, entity, cid, str(rid), record, {}, {}, entry, view, new=False)
        ops = tuple(op for r in flows for op in r.ops)
        problems = tuple(p for r in flows for p in r.problems)
        return Decision(
            "queued" if ops else "exception" if problems else "noop",
            "workflows re-evaluated",
            entity=entity.name,
            canonical_id=cid,
            ops=ops,
            problems=problems,
            audits=tuple(a for r in flows for a in r.audits),
            instances=tuple(r.instance for r in flows),
        )


def validation(reason: str, detail: str, blocking_ref: str, instance_key: str) -> ProblemItem:
    """A problem that parks a workflow instance until ``blocking_ref`` appears."""
    return ProblemItem("validation", reason, detail, blocking_ref=blocking_ref, instance_key=instance_key)


def parked(
    name: str, key: str, ctx: WorkflowContext, entity: str, cid: str, problems: Sequence[ProblemItem]
) -> WorkflowResult:
    """The result of an instance that waits in the exception queue for its problems."""
    reasons = ",".join(p.reason for p in problems)
    instance = WorkflowInstance(name, key, entity, cid, PARKED, (f"parked:{reasons}",), reasons)
    audit = AuditItem("workflow_parked", {"workflow": name, "instance": key, "reasons": reasons})
    return WorkflowResult(instance, problems=tuple(problems), audits=(audit,))


def shadow_values(view: StateView, entity: str, cid: str, system: str) -> dict[str, Any]:
    """A record's shadow in ``system`` as plain values."""
    return {k: v.value for k, v in view.shadow(entity, cid, system).items()}


def related_values(
    ctx: WorkflowContext, entity: str, system: str, field: str, value: Any
) -> dict[str, dict[str, Any]]:
    """The known records of ``entity`` whose ``field`` equals ``value``, with this change laid over.

    The shadow holds every record but the one being resolved, which is taken from the
    change itself (it reaches the shadow when this decision is applied).
    """
    found: dict[str, dict[str, Any]] = {
        cid: _plain(fields) for cid, fields in ctx.view.related(entity, system, field, value).items()
    }
    if ctx.entity.name == entity and ctx.system == system:
        found.pop(ctx.canonical_id, None)
        if ctx.change.op != "delete" and ctx.record.get(field) == value:
            found[ctx.canonical_id] = dict(ctx.record)
    return found


def _plain(fields: Mapping[str, SeenValue]) -> dict[str, Any]:
    return {k: v.value for k, v in fields.items()}


def decimal(value: Any) -> Decimal:
    """A canonical decimal text (or None) as a Decimal; None counts as zero."""
    return Decimal(str(value)) if value not in (None, "") else Decimal(0)


def latest(values: Sequence[Any]) -> str | None:
    """The latest of canonical datetime or date texts (they sort in time order), or None."""
    known = [v for v in values if v]
    return max(known) if known else None


def metrics_op(
    ctx: WorkflowContext,
    *,
    instance_key: str,
    deal_entity: EntityConfig,
    deal_cid: str,
    crm: str,
    crm_fields: Mapping[str, str],
    metrics: Mapping[str, Any],
) -> Op | None:
    """An update of the deal in the CRM with the metrics that differ from what it last got.

    Metric values are Decimals, texts or None; the op writes them as they are and records
    their canonical text, which the next computation compares with: the value a queued op
    is about to write if there is one, else the one the CRM last got.
    """
    crm_id = ctx.view.external_id(deal_entity.name, deal_cid, crm)
    if crm_id is None:
        return None
    known = {
        **shadow_values(ctx.view, deal_entity.name, deal_cid, crm),
        **ctx.view.pending_values(deal_entity.name, deal_cid, crm),
    }
    canonical = {k: amount(v) if isinstance(v, Decimal) else v for k, v in metrics.items() if k in crm_fields}
    out = {k: v for k, v in canonical.items() if known.get(k, object()) != v}
    if not out:
        return None
    m = deal_entity.systems[crm]
    return Op(
        idempotency_key=f"wf:{instance_key}:{crm}",
        target=crm,
        entity=deal_entity.name,
        canonical_id=deal_cid,
        object_name=m.object,
        action="upsert",
        key={m.key: crm_id},
        fields={crm_fields[k]: metrics[k] for k in out},
        trace_id=ctx.change.trace_id,
        source_seq=ctx.seq,
        canonical=out,
        workflow=instance_key,
    )


def iso(value: datetime | None) -> str | None:
    """A datetime as canonical text (UTC, seconds, ``Z``), or None."""
    return datetime_text(value) if value is not None else None


def amount(value: Decimal) -> str:
    """A Decimal as canonical decimal text."""
    return decimal_text(value)


def unit_step(
    object_name: str,
    key: Mapping[str, Any],
    fields: Mapping[str, Any],
    entity: str,
    canonical_id: str,
    canonical: Mapping[str, Any],
) -> dict[str, Any]:
    """One step of a ``unit`` op: an upsert by ``key``; ``{"$step": n}`` values are step n's id.

    ``entity``/``canonical_id``/``canonical`` tell the pipeline what to link and record in
    the shadow once the unit committed; the sink reads only object, key and fields.
    """
    return {
        "object": object_name,
        "key": dict(key),
        "fields": dict(fields),
        "entity": entity,
        "canonical_id": canonical_id,
        "canonical": dict(canonical),
    }


def follow_up(
    name: str,
    target: str,
    entity: str,
    canonical_id: str,
    object_name: str,
    key: Mapping[str, Any],
    fields: Mapping[str, Any],
    canonical: Mapping[str, Any],
) -> dict[str, Any]:
    """An op the pipeline enqueues once the unit committed, its ``{"$step": n}`` values filled in."""
    return {
        "name": name,
        "target": target,
        "entity": entity,
        "canonical_id": canonical_id,
        "object": object_name,
        "key": dict(key),
        "fields": dict(fields),
        "canonical": dict(canonical),
    }

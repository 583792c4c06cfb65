"""The state side of workflows, called by the pipeline: instances, unit outcomes, follow-ups.

- When a decision is applied, ``record_instances`` writes each instance it carries and its
  problems (anchored at the instance's first trigger, so a parked deal that changes again
  bumps its exception item instead of opening another one), and closes the instance's
  items once it proceeds.
- When a ``unit`` op is applied, ``applied_unit`` links every step's record to the id the
  ERP gave it, records what was written in the shadow and enqueues the follow-ups with
  those ids filled in. ``step_done`` then notes the step and completes the instance when
  its last op went through; ``rejected`` marks it failed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from agent.config import Config
from agent.decision import Decision
from agent.errors import DataError
from agent.logging import log_event
from agent.model import Change, JournalEntry, Op, Outcome
from agent.parking import open_problem
from agent.workflows.base import PARKED
from state import exceptions, outbox, shadow, workflows, xref
from state.db import State

logger = logging.getLogger(__name__)


def record_instances(st: State, entry: JournalEntry, d: Decision) -> None:
    """Write the decision's workflow instances and open (or close) their exception items."""
    c = entry.change
    for inst in d.instances:
        row = workflows.record(
            st,
            workflow=inst.workflow,
            key=inst.key,
            entity=inst.entity,
            canonical_id=inst.canonical_id,
            status=inst.status,
            trigger_seq=entry.seq,
            trace_id=c.trace_id,
            trigger=_trigger(c),
            trigger_ts=c.source_ts or entry.captured_at,
            steps=inst.steps,
            detail=inst.detail,
        )
        opened = [
            open_problem(
                st,
                p,
                c,
                trace_id=row.trace_id,
                entity=inst.entity,
                canonical_id=inst.canonical_id,
                journal_seq=row.trigger_seq,
            )
            for p in d.problems
            if p.instance_key == inst.key
        ]
        earlier = workflows.take_exceptions(st, inst.key)
        outcome = "problem gone" if inst.status == PARKED else f"workflow {inst.status}"
        for item_id in earlier:
            if item_id not in opened:
                exceptions.resolve(st, item_id, actor="agent", resolution=f"retried: {outcome}")
        if inst.status == PARKED:
            workflows.note_exceptions(st, inst.key, opened)
            log_event(
                logger,
                "workflow_parked",
                workflow=inst.workflow,
                instance=inst.key,
                trace_id=row.trace_id,
                reasons=inst.detail,
                level=logging.WARNING,
            )
        else:
            log_event(logger, "workflow_step", workflow=inst.workflow, instance=inst.key, status=inst.status)


def _trigger(c: Change) -> dict[str, Any]:
    """The trigger change, by position and field names (values stay in the journal)."""
    return {
        "source": c.source,
        "object": c.object_name,
        "op": c.op,
        "key": dict(c.key),
        "position": c.position,
        "fields": sorted(c.fields),
    }


def parked_at(st: State, journal_seq: int) -> bool:
    """Whether a parked workflow instance waits on the journal entry ``journal_seq``."""
    return bool(workflows.parked_on(st, journal_seq))


def applied_unit(st: State, config: Config, op: Op, out: Outcome) -> list[str]:
    """Link, shadow and follow up a committed unit op; return the records that now exist.

    The returned references (``contract:<canonical id>``) name records other parked
    items may be waiting for.
    """
    ids = _step_ids(out)
    steps: Sequence[Mapping[str, Any]] = op.fields.get("steps") or []
    refs = []
    for step, step_id in zip(steps, ids, strict=False):
        entity, cid = step.get("entity"), step.get("canonical_id")
        if not entity or not cid or step_id is None:
            continue
        try:
            xref.link(st, entity, cid, op.target, str(step_id))
        except DataError as exc:
            log_event(
                logger,
                "workflow_link_conflict",
                instance=op.workflow,
                entity=entity,
                reason=exc.reason,
                level=logging.WARNING,
            )
            continue
        values = step.get("canonical") or {}
        if values:
            shadow.put(st, entity, cid, values, system=op.target, by_agent=True, source_ts=out.written_at)
        e = config.entities.get(entity)
        match_on = e.systems[op.target].match_on if e is not None and op.target in e.systems else None
        if match_on and values.get(match_on) is not None:
            xref.note_natural(st, entity, match_on, values[match_on], cid)
        refs.append(f"{entity}:{cid}")
    follow = [_follow_up(op, t, ids) for t in op.fields.get("then") or []]
    outbox.enqueue(st, follow)
    return refs


def _step_ids(out: Outcome) -> list[Any]:
    try:
        ids = json.loads(out.external_id or "[]")
    except ValueError:
        return []
    return ids if isinstance(ids, list) else []


def _fill(value: Any, ids: Sequence[Any]) -> Any:
    """Replace ``{"$step": n}`` by step n's id, anywhere in ``value``."""
    if isinstance(value, dict):
        if set(value) == {"$step"} and isinstance(value["$step"], int) and value["$step"] < len(ids):
            return ids[value["$step"]]
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    return value


def _follow_up(op: Op, template: Mapping[str, Any], ids: Sequence[Any]) -> Op:
    return Op(
        idempotency_key=f"{op.idempotency_key}:then:{template['name']}",
        target=template["target"],
        entity=template["entity"],
        canonical_id=template["canonical_id"],
        object_name=template["object"],
        action="upsert",
        key=_fill(template["key"], ids),
        fields=_fill(template["fields"], ids),
        trace_id=op.trace_id,
        canonical=_fill(template.get("canonical") or {}, ids),
        workflow=op.workflow,
    )


def step_done(st: State, op: Op, out: Outcome) -> None:
    """Note an applied op as a step of its instance; complete the instance after its last op."""
    if not op.workflow:
        return
    unit = op.action == "unit"
    detail = {"ids": _step_ids(out)} if unit else {"id": out.external_id}
    done = outbox.pending_for_workflow(st, op.workflow) == 0
    label = f"{op.target}:{'unit' if unit else op.object_name}"
    workflows.mark_step(st, op.workflow, label, detail=detail, completed=done)
    if done:
        row = workflows.get(st, op.workflow)
        log_event(
            logger,
            "workflow_completed",
            workflow=row.workflow if row else None,
            instance=op.workflow,
            trace_id=op.trace_id,
            latency_ms=round((row.latency_seconds or 0) * 1000) if row else None,
        )


def rejected(st: State, op: Op, reason: str) -> None:
    """Mark the op's instance failed: a target refused one of its ops."""
    if op.workflow:
        workflows.mark_failed(st, op.workflow, f"{op.target} rejected {op.object_name}: {reason}")

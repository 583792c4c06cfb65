"""Resolve one journaled change into a decision: ops for the other systems, audit, exceptions.

Pure: everything it needs to know about state comes through a ``StateView``, and the
decision it returns is applied by ``agent.pipeline`` in the same transaction as the
resolver's checkpoint. Per change: find the entity mapping, drop origin echoes, find or
mint the canonical id (cross-reference, the counterpart's id stored in the record, or a
natural key), map to canonical fields, compare with the shadow of the source system (what
the agent last saw there: API echoes compare equal), apply field ownership, and build
upserts keyed so that a replay cannot create twice. Workflows (``agent.workflows``) then
add their ops, problems and instances; a first copy a workflow claims is left to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent import ownership
from agent.config import Config, EntityConfig, SystemMapping
from agent.decision import AuditItem, Decision, ProblemItem, SeenValue, StateView
from agent.echo import changed_fields, is_origin_echo, without_stale
from agent.errors import DataError
from agent.mapping import EntityMapper
from agent.model import Change, JournalEntry, Op

if TYPE_CHECKING:  # the workflows import this module; this one only names their types
    from agent.workflows.base import WorkflowResult, WorkflowSet


class Resolver:
    """Turns journal entries into decisions under one configuration."""

    def __init__(
        self, config: Config, *, own_origins: frozenset[str], workflows: WorkflowSet | None = None
    ) -> None:
        self.config = config
        self.own_origins = own_origins
        self.workflows = workflows
        # (entity, system) pairs whose first copy only a workflow creates (a deal in the ERP).
        self.claims: frozenset[tuple[str, str]] = workflows.claims if workflows else frozenset()
        self._mappers = {name: EntityMapper(e) for name, e in config.entities.items()}
        self._by_object: dict[tuple[str, str], EntityConfig] = {}
        for e in config.entities.values():
            for system, m in e.systems.items():
                self._by_object[(system, m.object)] = e

    def entity_for(self, system: str, object_name: str) -> EntityConfig | None:
        """The entity that ``system`` stores in ``object_name``, if mapped."""
        return self._by_object.get((system, object_name))

    def mapper(self, entity: str) -> EntityMapper:
        """The field mapper of ``entity``."""
        return self._mappers[entity]

    def resolve(self, entry: JournalEntry, view: StateView) -> Decision:
        """Decide what one journaled change means for the other systems."""
        c = entry.change
        entity = self.entity_for(c.source, c.object_name)
        if entity is None:
            return Decision("skipped", "object not mapped")
        if is_origin_echo(c, self.own_origins):
            return Decision("echo", f"origin {c.origin}", entity=entity.name)
        if c.op == "truncate":
            return Decision(
                "exception",
                "truncate of a mapped table",
                entity=entity.name,
                problems=(
                    ProblemItem(
                        "source_event",
                        "truncate",
                        f"{c.object_name} was truncated in {c.source}; "
                        "nothing was propagated: review, then resync or resolve",
                    ),
                ),
            )
        m = entity.systems[c.source]
        rid = _record_id(c, m)
        if rid is None:
            return Decision(
                "exception",
                "no key",
                entity=entity.name,
                problems=(
                    ProblemItem("mapping", "missing_key", f"{c.object_name} change has no {m.key}", m.key),
                ),
            )
        try:
            return _Resolution(self, entity, m, entry, rid, view).run()
        except DataError as exc:
            return Decision(
                "exception",
                exc.reason,
                entity=entity.name,
                problems=(ProblemItem("mapping", "invalid_value", str(exc), exc.field),),
            )


def _record_id(c: Change, m: SystemMapping) -> str | None:
    key = c.old_key if (c.op == "delete" and c.old_key) else c.key
    value = key.get(m.key, c.fields.get(m.key))
    return None if value is None else str(value)


class _Resolution:
    """The work of resolving one change (kept apart so each step stays small)."""

    def __init__(
        self,
        r: Resolver,
        entity: EntityConfig,
        m: SystemMapping,
        entry: JournalEntry,
        rid: str,
        view: StateView,
    ) -> None:
        self.r, self.entity, self.m, self.entry, self.rid, self.view = r, entity, m, entry, rid, view
        self.c = entry.change
        self.mapper = r.mapper(entity.name)
        self.audits: list[AuditItem] = []
        self.problems: list[ProblemItem] = []
        self.ops: list[Op] = []

    def run(self) -> Decision:
        c, view, name = self.c, self.view, self.entity.name
        canonical = self.mapper.to_canonical(c.source, c.fields, record=self._record(), refs=self._ref_in)
        cid, new = self._canonical_id(canonical)
        natural = tuple((f, canonical[f]) for f in {self.m.match_on} if f and f in canonical)
        if c.op == "delete":
            return self._delete(cid)
        seen_before = view.shadow(name, cid, c.source)
        fresh = without_stale(canonical, seen_before, c.source_ts, self.entry.captured_at)
        changed = changed_fields(fresh, {k: v.value for k, v in seen_before.items()})
        # A value an op queued for this very system writes (or wrote, its answer lost) is the
        # agent's own write coming back, even before the shadow records it; so is an earlier
        # op's value while a later one for the same field is still on its way.
        ours = view.queued_values(name, cid, c.source) if changed else {}
        changed = {k: v for k, v in changed.items() if v not in ours.get(k, ())}
        changed = self._late_writes(cid, changed, seen_before)
        flows = self._workflows(cid, canonical, changed, seen_before, new)
        # A record is in step only where it exists: a target still without a copy (its first
        # copy failed or was parked, e.g. for a customer not yet linked) gets one now.
        unlinked = [
            t for t in self.entity.systems if t != c.source and view.external_id(name, cid, t) is None
        ]
        if not changed and not new and not flows and not unlinked and not self.ops:
            # Values the shadow lacks here are the agent's own, still unanswered: recorded as seen.
            echoed = {k: v for k, v in fresh.items() if k not in seen_before or seen_before[k].value != v}
            return Decision(
                "noop", "in step", entity=name, canonical_id=cid, link=(c.source, self.rid), seen=echoed
            )
        for target in self.entity.systems:
            if target != c.source and (changed or new or target in unlinked):
                self._for_target(target, cid, canonical, changed, seen_before)
        for r in flows:
            self.ops.extend(r.ops)
            self.problems.extend(r.problems)
            self.audits.extend(r.audits)
        fate = "queued" if self.ops else self._fate_without_ops()
        detail = f"{len(changed)} field(s) changed" if self.ops else None
        return Decision(
            fate,
            detail,
            entity=name,
            canonical_id=cid,
            link=(c.source, self.rid),
            seen=fresh,
            natural=natural,
            ops=tuple(self.ops),
            problems=tuple(self.problems),
            audits=tuple(self.audits),
            instances=tuple(r.instance for r in flows),
        )

    def _workflows(
        self,
        cid: str,
        canonical: Mapping[str, Any],
        changed: Mapping[str, Any],
        seen_before: Mapping[str, SeenValue],
        new: bool,
    ) -> list[WorkflowResult]:
        if self.r.workflows is None:
            return []
        ts = self.c.source_ts
        record = {k: v.value for k, v in seen_before.items()}
        for k, v in canonical.items():
            seen = seen_before.get(k)
            if seen is None or seen.source_ts is None or ts is None or ts >= seen.source_ts:
                record[k] = v  # a change older than the shadow's value does not roll it back
        previous = {k: seen_before[k].value for k in changed if k in seen_before}
        return self.r.workflows.run(
            self.r.config,
            self.entity,
            cid,
            self.rid,
            record,
            changed,
            previous,
            self.entry,
            self.view,
            new=new,
        )

    def _fate_without_ops(self) -> str:
        if self.problems:
            return "exception"
        actions = {a.action for a in self.audits}
        if "conflict_resolved" in actions:
            return "conflict"
        if "ownership_ignored" in actions:
            return "ignored"
        return "noop"

    def _record(self) -> str:
        return f"{self.c.source}:{self.c.object_name}:{self.rid}"

    def _canonical_id(self, canonical: Mapping[str, Any]) -> tuple[str, bool]:
        c, view, name = self.c, self.view, self.entity.name
        cid = view.canonical_id(name, c.source, self.rid)
        if cid:
            return cid, False
        counterpart = self.m.external_id and c.fields.get(self.m.external_id)
        if counterpart:
            for other in self.entity.systems:
                if other != c.source:
                    cid = view.canonical_id(name, other, str(counterpart))
                    if cid:
                        return cid, False
        if self.m.match_on and canonical.get(self.m.match_on) is not None:
            cid = view.find_natural(name, self.m.match_on, canonical[self.m.match_on])
            if cid:
                return cid, False
        return view.new_canonical_id(), True

    def _ref_in(self, ref_entity: str, system: str, value: Any) -> Any:
        return self.view.canonical_id(ref_entity, system, str(value))

    def _ref_out_for(self, target: str):  # type: ignore[no-untyped-def]
        def translate(ref_entity: str, _system: str, value: Any) -> Any:
            return self.view.external_id(ref_entity, str(value), target)

        return translate

    def _delete(self, cid: str) -> Decision:
        name, c = self.entity.name, self.c
        policy = self.entity.on_delete
        if policy == "ignore":
            return Decision(
                "ignored",
                "delete ignored by policy",
                entity=name,
                canonical_id=cid,
                audits=(AuditItem("delete_ignored", {"system": c.source, "record": self.rid}),),
            )
        if policy == "exception":
            return Decision(
                "exception",
                "delete parked for review",
                entity=name,
                canonical_id=cid,
                problems=(
                    ProblemItem(
                        "source_event",
                        "deleted_in_source",
                        f"{self._record()} was deleted in {c.source}; review before deleting elsewhere",
                    ),
                ),
            )
        for target, tm in self.entity.systems.items():
            tid = self.view.external_id(name, cid, target) if target != c.source else None
            if tid:
                self.ops.append(self._op(target, tm, cid, "delete", {tm.key: tid}, {}, {}))
        return Decision(
            "queued" if self.ops else "noop", "delete", entity=name, canonical_id=cid, ops=tuple(self.ops)
        )

    def _for_target(
        self,
        target: str,
        cid: str,
        canonical: Mapping[str, Any],
        changed: Mapping[str, Any],
        seen_before: Mapping[str, SeenValue],
    ) -> None:
        name, c = self.entity.name, self.c
        tm = self.entity.systems[target]
        tid = self.view.external_id(name, cid, target)
        if tid is None and (name, target) in self.r.claims:
            return  # a workflow creates this record in the target (e.g. a won deal in the ERP)
        # What the target will hold once the ops already queued for it land: the value a
        # change is compared with, not the target's last known value alone.
        queued = self.view.pending_values(name, cid, target)
        if tid is not None:
            seen_target = self.view.shadow(name, cid, target)
        elif queued:
            # The first copy is queued (or applied, its answer not yet recorded): this change is
            # no first copy; ownership judges it against what that copy will create.
            seen_target = {k: SeenValue(v, None) for k, v in queued.items()}
        else:
            # A first copy in the target: ownership governs changes, not the first values.
            fields = self._create_fields(target, cid, canonical)
            if fields:
                self._upsert(target, tm, cid, None, fields)
            return
        out: dict[str, Any] = {}
        revert: dict[str, Any] = {}
        for fname, value in changed.items():
            rule = self.entity.fields[fname]
            if target not in rule.columns:
                continue
            theirs = seen_target.get(fname)
            if fname in queued:
                if queued[fname] == value:
                    continue  # an op already queued writes this value: in step once it lands
            elif theirs is not None and theirs.value == value:
                continue  # the target holds this value and nothing queued will change it: in step
            before = seen_before.get(fname)
            other_changed = (
                theirs is not None
                and before is not None
                and theirs.value != before.value
                and theirs.value != value
            )
            d = ownership.decide(
                self.entity,
                rule,
                source=c.source,
                other_changed=other_changed,
                source_ts=c.source_ts,
                other_ts=theirs.source_ts if theirs else None,
            )
            audit = {
                "field": fname,
                "source": c.source,
                "target": target,
                "reason": d.reason,
                "source_ts": _iso(c.source_ts),
                "other_ts": _iso(theirs.source_ts if theirs else None),
                "new_value": value,
                "other_value": theirs.value if theirs else None,
            }
            if d.verdict == "propagate":
                out[fname] = value
            elif d.verdict == "conflict_won":
                out[fname] = value
                self.audits.append(AuditItem("conflict_resolved", {**audit, "winner": c.source}))
                if fname in self.view.pending_fields(name, cid, c.source):
                    # The loser's value is already queued for the source: re-assert the winner after it.
                    revert[fname] = value
            elif d.verdict == "conflict_lost":
                self.audits.append(AuditItem("conflict_resolved", {**audit, "winner": target}))
                if theirs is not None:
                    revert[fname] = theirs.value
            elif d.verdict == "ignore":
                self.audits.append(AuditItem("ownership_ignored", audit))
            elif d.verdict == "revert" and theirs is not None and rule.owner == target:
                revert[fname] = theirs.value
                self.audits.append(AuditItem("ownership_reverted", audit))
            elif d.verdict == "exception" and rule.owner == target:
                self.audits.append(AuditItem("ownership_exception", audit))
                self.problems.append(
                    ProblemItem(
                        "ownership",
                        "non_owner_edit",
                        f"{fname} is owned by {rule.owner} but changed in {c.source}",
                        fname,
                    )
                )
        if out:
            # The values the target holds (or will, once queued ops land) that this op replaces:
            # a resend whose first answer was lost compares the target with them (agent.resend).
            base = {
                f: queued[f] if f in queued else seen_target[f].value
                for f in out
                if f in queued or f in seen_target
            }
            self._upsert(target, tm, cid, tid, out, base)
        if revert:
            sm = self.m
            native = self.mapper.to_native(
                c.source, revert, record=self._record(), refs=self._ref_out_for(c.source)
            )
            self.ops.append(
                Op(
                    idempotency_key=f"{c.source}:{c.position}:revert:{target}",
                    target=c.source,
                    entity=name,
                    canonical_id=cid,
                    object_name=sm.object,
                    action="upsert",
                    key={sm.key: self.rid},
                    fields=native,
                    trace_id=c.trace_id,
                    source_seq=self.entry.seq,
                    canonical=revert,
                    base={f: changed[f] for f in revert if f in changed},
                )
            )

    def _late_writes(
        self, cid: str, changed: Mapping[str, Any], seen_before: Mapping[str, SeenValue]
    ) -> dict[str, Any]:
        """Take back what an earlier, unanswered attempt of ours rolled the source back to.

        A server may finish a call its client (a killed agent) never heard back from, after
        the agent's newer write: the record then shows an older value the agent itself sent.
        That is no edit to pass on: the newer value is written again, and audited.
        """
        late = self.view.late_values(self.entity.name, cid, self.c.source) if changed else {}
        rolled = {
            k: seen_before[k].value
            for k, v in changed.items()
            if v in late.get(k, ()) and k in seen_before and seen_before[k].value != v
        }
        if not rolled:
            return dict(changed)
        c, sm = self.c, self.m
        for fname, value in rolled.items():
            self.audits.append(
                AuditItem(
                    "late_write_reasserted",
                    {"field": fname, "system": c.source, "found": changed[fname], "reasserted": value},
                )
            )
        self.ops.append(
            Op(
                idempotency_key=f"{c.source}:{c.position}:reassert",
                target=c.source,
                entity=self.entity.name,
                canonical_id=cid,
                object_name=sm.object,
                action="upsert",
                key={sm.key: self.rid},
                fields=self.mapper.to_native(
                    c.source, rolled, record=self._record(), refs=self._ref_out_for(c.source)
                ),
                trace_id=c.trace_id,
                source_seq=self.entry.seq,
                canonical=rolled,
                base={k: changed[k] for k in rolled},
            )
        )
        return {k: v for k, v in changed.items() if k not in rolled}

    def _create_fields(self, target: str, cid: str, canonical: Mapping[str, Any]) -> dict[str, Any]:
        """All fields a new record in ``target`` gets: every value known from the source.

        Ownership governs changes; a record that does not exist yet in ``target`` takes its
        first values from wherever they are known. A ``required`` field that ``target`` does
        not assign itself must be known, or nothing is created.
        """
        known = {k: v.value for k, v in self.view.shadow(self.entity.name, cid, self.c.source).items()}
        known.update(canonical)
        fields = {
            k: v
            for k, v in known.items()
            if k in self.entity.fields and target in self.entity.fields[k].columns
        }
        missing = [
            r.name
            for r in self.entity.fields.values()
            if r.required and target in r.columns and r.owner != target and fields.get(r.name) is None
        ]
        if missing:
            self.problems.append(
                ProblemItem(
                    "validation",
                    "missing_required_field",
                    f"cannot create in {target}: {', '.join(missing)} missing",
                    missing[0],
                )
            )
            return {}
        return fields

    def _upsert(
        self,
        target: str,
        tm: SystemMapping,
        cid: str,
        tid: str | None,
        out: Mapping[str, Any],
        base: Mapping[str, Any] | None = None,
    ) -> None:
        c = self.c
        try:
            native = self.mapper.to_native(target, out, record=self._record(), refs=self._ref_out_for(target))
        except DataError as exc:
            self.problems.append(
                ProblemItem(
                    "dependency",
                    "reference_not_linked",
                    str(exc),
                    exc.field,
                    blocking_ref=f"{self.entity.name}:{cid}",
                )
            )
            return
        if tid is not None:
            key: dict[str, Any] = {tm.key: tid}
        elif tm.external_id:
            key = {tm.external_id: self.rid}
        else:
            self.problems.append(
                ProblemItem(
                    "mapping",
                    "no_external_id",
                    f"cannot create in {target} idempotently: set "
                    f"entities.{self.entity.name}.systems.{target}.external_id",
                    None,
                )
            )
            return
        if tid is None:
            # A first copy leaves empty values out, so the target's own defaults apply (a NOT
            # NULL column with a default must not receive an explicit NULL); the shadow still
            # records them as empty, so the target's echo of that emptiness is nothing new.
            native = {k: v for k, v in native.items() if v is not None}
        if tid is not None and tm.external_id:
            native[tm.external_id] = self.rid
        self.ops.append(
            Op(
                idempotency_key=f"{c.source}:{c.position}:{target}",
                target=target,
                entity=self.entity.name,
                canonical_id=cid,
                object_name=tm.object,
                action="upsert",
                key=key,
                fields=native,
                trace_id=c.trace_id,
                source_seq=self.entry.seq,
                canonical=dict(out),
                base=dict(base or {}),
            )
        )

    def _op(
        self,
        target: str,
        tm: SystemMapping,
        cid: str,
        action: str,
        key: Mapping[str, Any],
        fields: Mapping[str, Any],
        canonical: Mapping[str, Any],
    ) -> Op:
        c = self.c
        return Op(
            idempotency_key=f"{c.source}:{c.position}:{target}",
            target=target,
            entity=self.entity.name,
            canonical_id=cid,
            object_name=tm.object,
            action=action,  # type: ignore[arg-type]
            key=key,
            fields=fields,
            trace_id=c.trace_id,
            source_seq=self.entry.seq,
            canonical=canonical,
        )


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None

"""Reconciliation: compare cross-referenced records field by field across systems; report, repair.

The live pipeline only knows what the systems told it. Reconciliation asks them again: it
walks the cross-reference of one entity in keyset pages, reads each page's records from every
system that can read by id (the optional ``Lookup`` capability), maps them to canonical values
and compares each field mapped in more than one system. It reports drift per field with the
field's owner, and records linked in the cross-reference that a system no longer has (hard
deletes the APIs never reported). Read-only by default. With ``repair`` it queues ops that push
the owner's value to the other systems (an audit row per field), and opens an exception item
per missing record; it never deletes anything.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agent.config import SHARED, EntityConfig, FieldRule
from agent.errors import ConfigError, ConfigIssue, DataError, PermanentError
from agent.logging import log_event
from agent.mapping import EntityMapper
from agent.model import Op, new_trace_id, utcnow
from state import audit, exceptions, outbox, shadow, xref
from state.db import State

if TYPE_CHECKING:
    from agent.daemon import Runtime

logger = logging.getLogger(__name__)

EXCEPTION_KIND = "reconcile"
DEFAULT_PAGE_SIZE = 500
DETAIL_LIMIT = 1000

Progress = Callable[[int, int], None]
"""Called after each page with (records done, records in the cross-reference)."""


@runtime_checkable
class Lookup(Protocol):
    """Optional connector capability: read the current records of an object by id."""

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return ``{id: native record}`` for ``ids``; ``None`` where the system has no such record."""
        ...


# --- pure comparison ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field whose canonical values differ between the systems holding one record."""

    field: str
    owner: str
    values: Mapping[str, Any]
    winner: str | None
    targets: tuple[str, ...]


def winner_of(entity: EntityConfig, rule: FieldRule, systems: Iterable[str]) -> str | None:
    """The system whose value a repair pushes: the owner, or for a shared field a named conflict winner."""
    present = set(systems)
    if rule.owner != SHARED:
        return rule.owner if rule.owner in present else None
    if entity.on_conflict != "latest" and entity.on_conflict in present:
        return entity.on_conflict
    return None


def same_value(a: Any, b: Any, ftype: str) -> bool:
    """Tell whether two canonical values are in step."""
    if ftype == "string":
        # Salesforce and others store an empty text as null: that is not drift.
        a, b = (None if a == "" else a), (None if b == "" else b)
    return bool(a == b)


def compare(entity: EntityConfig, values: Mapping[str, Mapping[str, Any]]) -> list[FieldDiff]:
    """Return the fields that differ, given each system's canonical values of one record.

    Only fields mapped in, and read from, at least two systems are compared. With a winner
    (the owner), each other system differing from it is a target; without one (a shared
    field under ``latest``, or the owner's value unknown) any difference is reported.
    """
    out: list[FieldDiff] = []
    for rule in entity.fields.values():
        here = {s: v[rule.name] for s, v in values.items() if s in rule.columns and rule.name in v}
        if len(here) < 2:
            continue
        winner = winner_of(entity, rule, here)
        if winner is not None:
            ref = here[winner]
            targets = tuple(s for s, v in here.items() if s != winner and not same_value(v, ref, rule.type))
            if targets:
                out.append(FieldDiff(rule.name, rule.owner, here, winner, targets))
            continue
        first = next(iter(here.values()))
        if any(not same_value(v, first, rule.type) for v in here.values()):
            out.append(FieldDiff(rule.name, rule.owner, here, None, ()))
    return out


# --- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    """A drifted field of one record, and what reconciliation did about it.

    ``status``: ``reported`` (read-only run), ``repaired`` (ops queued for ``targets``),
    ``in_flight`` (a queued op or a fresh change will write it: left alone), ``no_winner``
    (shared field or owner's value unknown) or ``unrepairable`` (the value cannot be written
    to a target: see the run's unreadable items). ``values`` are for ``--json`` only.
    """

    canonical_id: str
    field: str
    owner: str
    members: Mapping[str, str]
    values: Mapping[str, Any]
    winner: str | None
    targets: tuple[str, ...]
    status: str

    @property
    def present(self) -> dict[str, bool]:
        """Per system, whether it holds a value (not NULL) for the field."""
        return {s: v is not None for s, v in self.values.items()}


@dataclass(frozen=True, slots=True)
class Missing:
    """A record linked in the cross-reference that a system no longer has."""

    canonical_id: str
    system: str
    object_name: str
    external_id: str
    present_in: tuple[str, ...]
    exception_id: int | None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A value that could not be mapped between native and canonical (no value shown)."""

    canonical_id: str
    system: str
    field: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class FieldCount:
    """Per field: its owner, how many records drifted, and what became of them."""

    field: str
    owner: str
    drifted: int
    repaired: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """The outcome of one reconciliation run of one entity.

    Counts are exact; the detail tuples hold at most ``DETAIL_LIMIT`` items each
    (``truncated`` says when more were found).
    """

    entity: str
    run_id: str
    repair: bool
    started_at: datetime
    finished_at: datetime
    systems: tuple[str, ...]
    skipped_systems: Mapping[str, str]
    records: int
    compared: int
    in_step: int
    drifted_records: int
    single_system: int
    by_field: tuple[FieldCount, ...]
    missing_by_system: Mapping[str, int]
    unreadable_count: int
    ops_queued: int
    exceptions_opened: int
    drifts: tuple[Drift, ...]
    missing: tuple[Missing, ...]
    unreadable: tuple[Unreadable, ...]
    truncated: bool

    @property
    def ok(self) -> bool:
        """True when nothing drifted and nothing is missing."""
        return self.drifted_records == 0 and not any(self.missing_by_system.values())

    def as_dict(self, *, values: bool = True) -> dict[str, Any]:
        """The report as JSON-ready data, with ``ok``; ``values=False`` leaves field values out."""
        out = asdict(self)
        out["ok"] = self.ok
        out["started_at"], out["finished_at"] = self.started_at.isoformat(), self.finished_at.isoformat()
        for item, d in zip(out["drifts"], self.drifts, strict=True):
            item["present"] = d.present
            if not values:
                del item["values"]
        return out


# --- the run -------------------------------------------------------------------------------------


def lookups_of(runtime: Runtime, entity: EntityConfig) -> tuple[dict[str, Lookup], dict[str, str]]:
    """The systems of ``entity`` whose connector can read by id, and why the others are skipped."""
    found: dict[str, Lookup] = {}
    skipped: dict[str, str] = {}
    for system in entity.systems:
        conn = lookup_for(runtime, system)
        if conn is not None:
            found[system] = conn
        else:
            skipped[system] = "connector cannot read records by id"
    return found, skipped


def lookup_for(runtime: Runtime, system: str) -> Lookup | None:
    """The connector of ``system`` that can read records by id, if it has one."""
    for conn in (runtime.sources.get(system), runtime.sinks.get(system)):
        if conn is not None and isinstance(conn, Lookup):
            return conn
    return None


def reconcile(
    runtime: Runtime,
    st: State,
    entity: str,
    *,
    repair: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    progress: Progress | None = None,
    open_exceptions: bool | None = None,
    actor: str = "agent",
    clock: Callable[[], datetime] = utcnow,
) -> ReconcileReport:
    """Compare every cross-referenced record of ``entity`` across its systems; repair if asked.

    ``open_exceptions`` (default: as ``repair``) opens an exception item per missing record;
    re-running bumps the open item instead of adding another. A failing system call stops
    the run with its error; pages already repaired stay repaired.

    Raises:
        ConfigError: ``entity`` is not configured, or ``page_size`` is below 1.
        PermanentError: no system of the entity can read records by id.
    """
    cfg = runtime.config
    ent = cfg.entities.get(entity)
    if ent is None:
        known = ", ".join(sorted(cfg.entities)) or "none"
        raise ConfigError(
            [ConfigIssue(str(cfg.path), f"entities.{entity}", f"no such entity (known: {known})")]
        )
    if page_size < 1:
        raise ConfigError([ConfigIssue(str(cfg.path), "page_size", "must be at least 1")])
    lookups, skipped = lookups_of(runtime, ent)
    if not lookups:
        raise PermanentError(f"no system of {entity} can read records by id: nothing to reconcile")
    run = _Run(
        st,
        ent,
        lookups,
        repair=repair,
        open_exceptions=repair if open_exceptions is None else open_exceptions,
        actor=actor,
    )
    started, t0 = clock(), time.monotonic()
    total = xref.count(st, entity)
    done = 0
    after: str | None = None
    while True:
        items = xref.page(st, entity, after_canonical_id=after, limit=page_size)
        if not items:
            break
        run.page(items)
        done += len(items)
        after = items[-1][0]
        if progress is not None:
            progress(done, max(total, done))
        if len(items) < page_size:
            break
    report = run.report(started, clock(), skipped)
    _log_report(report, round((time.monotonic() - t0) * 1000))
    if repair and report.ops_queued:
        detail = {"run": report.run_id, "ops": report.ops_queued, "drifted_records": report.drifted_records}
        audit.record(st, "reconcile_repair_run", actor=actor, entity=entity, detail=detail)
    return report


def _trace_for(entity: str, canonical_id: str, system: str, external_id: str) -> str:
    """A stable trace id per missing record, so a nightly re-run finds its open exception item."""
    text = f"reconcile:{entity}:{canonical_id}:{system}:{external_id}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Run:
    """One reconciliation run: reads pages, compares, collects findings, repairs."""

    def __init__(
        self,
        st: State,
        entity: EntityConfig,
        lookups: Mapping[str, Lookup],
        *,
        repair: bool,
        open_exceptions: bool,
        actor: str,
    ) -> None:
        self.st, self.entity, self.lookups = st, entity, lookups
        self.repair, self.open_exceptions, self.actor = repair, open_exceptions, actor
        self.mapper = EntityMapper(entity)
        self.run_id = uuid.uuid4().hex[:12]
        self.n: Counter[str] = Counter()  # exact counts (the detail lists are capped)
        self.fields: dict[str, list[int]] = {}  # field -> [drifted, repaired, in_flight]
        self.missing_by_system: Counter[str] = Counter()
        self.drifts: list[Drift] = []
        self.missing: list[Missing] = []
        self.unreadable: list[Unreadable] = []
        self.truncated = False

    def page(self, items: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """Read one page of records from every system, compare, and record (or repair) findings."""
        fetched_at = utcnow()
        fetched: dict[str, dict[str, dict[str, Any] | None]] = {}
        for system, lookup in self.lookups.items():
            ids = [members[system] for _, members in items if system in members]
            if ids:
                fetched[system] = lookup.fetch(self.entity.systems[system].object, ids)
        found: list[tuple[str, Mapping[str, str], list[FieldDiff], list[str]]] = []
        for cid, members in items:
            self.n["records"] += 1
            values: dict[str, dict[str, Any]] = {}
            gone: list[str] = []
            for system, eid in members.items():
                if system not in self.lookups:
                    continue
                native = fetched.get(system, {}).get(eid)
                if native is None:
                    gone.append(system)
                else:
                    values[system] = self._canonical(cid, system, eid, native)
            if len(values) < 2:
                if not gone:
                    self.n["single_system"] += 1
                diffs: list[FieldDiff] = []
            else:
                self.n["compared"] += 1
                diffs = compare(self.entity, values)
                if diffs:
                    self.n["drifted_records"] += 1
                else:
                    self.n["in_step"] += 1
            if diffs or gone:
                found.append((cid, members, diffs, gone))
        if not found:
            return
        writes = self.repair or (self.open_exceptions and any(g for *_, g in found))
        with self.st.write_txn() if writes else nullcontext():
            for cid, members, diffs, gone in found:
                self._record(cid, members, diffs, gone, fetched_at)

    def _canonical(self, cid: str, system: str, eid: str, native: Mapping[str, Any]) -> dict[str, Any]:
        record = f"{system}:{self.entity.systems[system].object}:{eid}"
        out, errors = self.mapper.readable(system, native, record=record, refs=self._ref_in)
        for exc in errors:
            self._unreadable(cid, system, exc.field, exc.reason)
        return out

    def _ref_in(self, ref_entity: str, system: str, value: Any) -> Any:
        return xref.lookup(self.st, ref_entity, system, str(value))

    def _unreadable(self, cid: str, system: str, fname: str | None, reason: str) -> None:
        self.n["unreadable"] += 1
        self._keep(self.unreadable, Unreadable(cid, system, fname, reason))

    def _keep(self, items: list[Any], item: Any) -> None:
        if len(items) < DETAIL_LIMIT:
            items.append(item)
        else:
            self.truncated = True

    def _record(
        self,
        cid: str,
        members: Mapping[str, str],
        diffs: Sequence[FieldDiff],
        gone: Sequence[str],
        fetched_at: datetime,
    ) -> None:
        statuses = self._settle(cid, members, diffs, fetched_at) if diffs else {}
        for d in diffs:
            status = statuses[d.field]
            counts = self.fields.setdefault(d.field, [0, 0, 0])
            counts[0] += 1
            counts[1] += status == "repaired"
            counts[2] += status == "in_flight"
            self._keep(
                self.drifts,
                Drift(cid, d.field, d.owner, dict(members), d.values, d.winner, d.targets, status),
            )
        present = tuple(s for s in members if s in self.lookups and s not in gone)
        for system in gone:
            self.missing_by_system[system] += 1
            item_id = (
                self._open_missing(cid, system, members[system], present) if self.open_exceptions else None
            )
            obj = self.entity.systems[system].object
            self._keep(self.missing, Missing(cid, system, obj, members[system], present, item_id))

    def _settle(
        self, cid: str, members: Mapping[str, str], diffs: Sequence[FieldDiff], fetched_at: datetime
    ) -> dict[str, str]:
        """Tell in-flight drift apart and, when repairing, queue the winners' values; status per field."""
        name = self.entity.name
        pending = {f for op in outbox.pending_for(self.st, name, cid) for f in op.canonical}
        latest = shadow.get(self.st, name, cid)
        statuses: dict[str, str] = {}
        per_target: dict[str, dict[str, Any]] = {}
        for d in diffs:
            if d.winner is None:
                statuses[d.field] = "no_winner"
                continue
            seen = latest.get(d.field)
            if d.field in pending or (seen is not None and seen.updated_at >= fetched_at):
                # A queued op, or a change the agent saw after our read, will write this field:
                # pushing what we read could overtake it with an older value.
                statuses[d.field] = "in_flight"
                continue
            if not self.repair:
                statuses[d.field] = "reported"
                continue
            statuses[d.field] = "repaired"
            for target in d.targets:
                per_target.setdefault(target, {})[d.field] = d.values[d.winner]
        winners = {d.field: str(d.winner) for d in diffs if d.winner is not None}
        wanted = {f for canon in per_target.values() for f in canon}
        by_winner: dict[str, dict[str, Any]] = {}
        for target, canon in per_target.items():
            native: dict[str, Any] = {}
            refs, record = self._ref_out(target), f"{name}:{cid}"
            for fname, value in list(canon.items()):
                try:
                    native.update(self.mapper.to_native(target, {fname: value}, record=record, refs=refs))
                except DataError as exc:
                    del canon[fname]
                    self._unreadable(cid, target, exc.field, exc.reason)
            if canon:
                self._enqueue(cid, target, members[target], native, canon)
            for fname, value in canon.items():
                by_winner.setdefault(winners[fname], {})[fname] = value
        for fname in wanted - {f for canon in by_winner.values() for f in canon}:
            statuses[fname] = "unrepairable"
        for winner, canon in by_winner.items():
            # The winner's value was read just now: the shadow must know it, or a later
            # change back to the old value would look like no change at all.
            shadow.put(self.st, name, cid, canon, system=winner, by_agent=False, source_ts=None)
        return statuses

    def _ref_out(self, target: str) -> Callable[[str, str, Any], Any]:
        def translate(ref_entity: str, _system: str, value: Any) -> Any:
            return xref.external_id(self.st, ref_entity, str(value), target)

        return translate

    def _enqueue(
        self, cid: str, target: str, tid: str, native: Mapping[str, Any], canon: Mapping[str, Any]
    ) -> None:
        tm = self.entity.systems[target]
        trace = new_trace_id()
        op = Op(
            idempotency_key=f"reconcile:{self.run_id}:{self.entity.name}:{cid}:{target}",
            target=target,
            entity=self.entity.name,
            canonical_id=cid,
            object_name=tm.object,
            action="upsert",
            key={tm.key: tid},
            fields=dict(native),
            trace_id=trace,
            canonical=dict(canon),
        )
        self.n["ops"] += outbox.enqueue(self.st, [op])
        for fname in canon:
            rule = self.entity.fields[fname]
            audit.record(
                self.st,
                "reconcile_repaired",
                actor=self.actor,
                trace_id=trace,
                entity=self.entity.name,
                canonical_id=cid,
                detail={"run": self.run_id, "field": fname, "owner": rule.owner, "target": target,
                        "external_id": tid},
            )  # fmt: skip

    def _open_missing(self, cid: str, system: str, eid: str, present: tuple[str, ...]) -> int:
        name, obj = self.entity.name, self.entity.systems[system].object
        self.n["exceptions"] += 1
        return exceptions.open_item(
            self.st,
            kind=EXCEPTION_KIND,
            reason=f"missing_in_{system}",
            detail=(
                f"{name} {cid} is linked to {obj} {eid} in {system}, which no longer has it "
                f"(deleted without the API reporting it; still in {', '.join(present) or 'no system'}). "
                "Nothing was deleted elsewhere: review, then recreate, relink or delete by hand"
            ),
            trace_id=_trace_for(name, cid, system, eid),
            source=system,
            entity=name,
            canonical_id=cid,
            record={"object": obj, "key": {self.entity.systems[system].key: eid}},
        )

    def report(self, started: datetime, finished: datetime, skipped: Mapping[str, str]) -> ReconcileReport:
        """Freeze the run's findings."""
        n = self.n
        return ReconcileReport(
            entity=self.entity.name,
            run_id=self.run_id,
            repair=self.repair,
            started_at=started,
            finished_at=finished,
            systems=tuple(self.lookups),
            skipped_systems=dict(skipped),
            records=n["records"],
            compared=n["compared"],
            in_step=n["in_step"],
            drifted_records=n["drifted_records"],
            single_system=n["single_system"],
            by_field=tuple(
                FieldCount(f, self.entity.fields[f].owner, c[0], c[1], c[2])
                for f, c in sorted(self.fields.items())
            ),
            missing_by_system=dict(self.missing_by_system),
            unreadable_count=n["unreadable"],
            ops_queued=n["ops"],
            exceptions_opened=n["exceptions"],
            drifts=tuple(self.drifts),
            missing=tuple(self.missing),
            unreadable=tuple(self.unreadable),
            truncated=self.truncated,
        )


def _log_report(r: ReconcileReport, ms: int) -> None:
    warn = logging.WARNING
    for c in r.by_field:
        log_event(
            logger, "reconcile_drift", entity=r.entity, run=r.run_id, field=c.field, owner=c.owner,
            records=c.drifted, repaired=c.repaired, in_flight=c.in_flight, level=warn,
        )  # fmt: skip
    for system, count in sorted(r.missing_by_system.items()):
        log_event(
            logger, "reconcile_missing", entity=r.entity, run=r.run_id, system=system, records=count,
            level=warn,
        )  # fmt: skip
    log_event(
        logger, "reconcile_done", entity=r.entity, run=r.run_id, repair=r.repair, records=r.records,
        compared=r.compared, in_step=r.in_step, drifted=r.drifted_records,
        missing=sum(r.missing_by_system.values()), unreadable=r.unreadable_count, ops=r.ops_queued,
        skipped=",".join(r.skipped_systems) or None, ms=ms, level=logging.INFO if r.ok else warn,
    )  # fmt: skip

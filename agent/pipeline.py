"""The only stage wiring: capture -> journal -> resolve -> outbox -> deliver.

Each stage keeps one of the design's three transactional invariants:

- capture: journal rows + the source cursor, in one transaction; the source is told to
  ``commit`` (PostgreSQL advances its slot) only after that transaction committed;
- resolve: outbox ops + journal fates + the resolver's position, in one transaction;
- deliver: the outcome + cross-reference + shadow + outbox status, in one transaction.

A crash between any two steps repeats work that the journal's unique positions, the
outbox's idempotency keys and the sinks' upserts make harmless.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Literal

from agent.errors import DataError, PermanentError, RateLimited, RetryableError
from agent.gcpause import collector_paused
from agent.logging import log_event
from agent.model import Batch, Cursor, JournalEntry, Op, Outcome, utcnow
from agent.parking import open_problem
from agent.reconcile import Lookup
from agent.resend import narrow_replayed_first_copy, verify_in_doubt
from agent.resolve import Decision, Resolver
from agent.retry import RetryPolicy, retry_after_of
from agent.storeview import StoreView
from agent.workflows import runner
from agent.writeback import is_first_copy, writeback_ops
from connectors.base import Resync, Sink, Source
from connectors.postgres import rowformat
from state import audit, checkpoints, exceptions, journal, outbox, shadow, xref
from state.db import State
from state.exceptions import ExceptionItem

logger = logging.getLogger(__name__)

RESOLVER_OWNER = "resolver"
RESOLVER_STREAM = "journal"
# How journaled raw rows are decoded when read, by their shape's format.
ROW_FORMATS: Mapping[str, journal.RowDecoder] = MappingProxyType({rowformat.FORMAT: rowformat.row_decoder})


def source_owner(name: str) -> str:
    """Checkpoint owner of a source connector."""
    return f"source:{name}"


class CheckpointMovedError(RetryableError):
    """A checkpoint was rewound while a stage was working from the old position."""


@dataclass(frozen=True, slots=True)
class CaptureResult:
    """What one capture cycle of one stream did."""

    source: str
    stream: str
    read: int
    journaled: int
    batches: int
    seconds: float


def capture(
    source: Source,
    st: State,
    stream: str,
    *,
    limit: int = 10_000,
    max_batches: int | None = None,
    clock: Callable[[], datetime] = utcnow,
    should_stop: Callable[[], bool] | None = None,
) -> CaptureResult:
    """Read one stream until it has nothing more (or ``max_batches``), journaling each batch.

    ``should_stop`` is asked after every committed batch: a stopping agent finishes the
    batch in flight, commits it, and leaves the rest for the next start.

    The checkpoint generation is read once; if an operator rewinds it meanwhile, the
    advance is refused and this cycle stops, so the next one starts from the new position.
    """
    started = time.monotonic()
    owner = source_owner(source.name)
    cp = checkpoints.get(st, owner, stream)
    cursor = cp.cursor if cp else None
    generation = cp.generation if cp else 0
    read = journaled = batches = 0
    while True:
        # Stamped when the read began: a record image is no newer than that, which the
        # resolver relies on to tell an image read before the agent's own write from an edit.
        read_at = clock()
        with collector_paused():
            batch = source.read(stream, cursor, limit=limit)
            batches += 1
            read += len(batch.changes)
            n, generation = _journal_batch(st, owner, stream, batch, generation, read_at)
            journaled += n
            cursor, more = batch.next_cursor, batch.more
            del batch  # its changes are freed before the collector is back
        source.commit(stream, cursor)
        if not more or (max_batches is not None and batches >= max_batches):
            break
        if should_stop is not None and should_stop():
            break
    seconds = time.monotonic() - started
    log_event(
        logger,
        "capture_cycle",
        source=source.name,
        stream=stream,
        read=read,
        journaled=journaled,
        batches=batches,
        cursor=_cursor_text(cursor),
        ms=round(seconds * 1000),
    )
    return CaptureResult(source.name, stream, read, journaled, batches, seconds)


def _journal_batch(
    st: State, owner: str, stream: str, batch: Batch, generation: int, read_at: datetime
) -> tuple[int, int]:
    """Journal one batch and move the cursor in one transaction; return (new rows, generation)."""
    with st.write_txn():
        n = journal.append(st, batch.changes, captured_at=read_at)
        for bad in batch.rejected:
            exceptions.open_item(
                st,
                kind="capture",
                reason=bad.reason,
                detail=f"{bad.record}: {bad.reason}",
                trace_id=_stable_trace(owner, bad.record, bad.reason),
                source=owner.partition(":")[2],
                record=dict(bad.payload),
                field=bad.field,
            )
        if batch.rejected:
            log_event(
                logger,
                "records_rejected_at_capture",
                source=owner,
                stream=stream,
                n=len(batch.rejected),
                level=logging.WARNING,
            )
        moved = checkpoints.advance(st, owner, stream, batch.next_cursor, expected_generation=generation)
        if moved is None:
            raise CheckpointMovedError(f"checkpoint {owner}/{stream} was rewound during capture; re-reading")
    return n, moved.generation


def _stable_trace(*parts: str) -> str:
    """A trace id that is the same each time the same bad record is read again (one item, not many)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def run_resync(
    source: Resync,
    st: State,
    *,
    source_name: str,
    table: str,
    since: datetime | None,
    chunk: int = 5000,
    clock: Callable[[], datetime] = utcnow,
) -> Iterator[int]:
    """Re-read ``table`` of a source that cannot rewind as ``read`` changes; yield rows journaled.

    Progress is a checkpoint (``resync:<table>``), so an interrupted resync resumes after
    the last journaled key instead of starting over.
    """
    owner, stream = source_owner(source_name), f"resync:{table}"
    cp = checkpoints.get(st, owner, stream)
    after_key = None
    if cp and cp.cursor.data.get("state") == "running" and cp.cursor.data.get("since") == _iso(since):
        after_key = cp.cursor.data.get("after_key")
    generation = cp.generation if cp else 0
    for batch in source.resync(table, since=since, after_key=after_key, chunk=chunk):
        progress = Cursor(
            {
                "v": 1,
                "state": "running",
                "since": _iso(since),
                "after_key": batch.next_cursor.data.get("after_key"),
            }
        )
        with st.write_txn():
            n = journal.append(st, batch.changes, captured_at=clock())
            if checkpoints.advance(st, owner, stream, progress, expected_generation=generation) is None:
                raise CheckpointMovedError(f"resync of {table} was restarted elsewhere")
            generation = generation or 1
        yield n
    with st.write_txn():
        checkpoints.advance(
            st,
            owner,
            stream,
            Cursor({"v": 1, "state": "done", "since": _iso(since), "finished_at": clock().isoformat()}),
        )


# --- resolve -----------------------------------------------------------------------------------


def resolve_pending(st: State, resolver: Resolver, *, limit: int = 5000) -> int:
    """Resolve journal entries after the resolver's checkpoint; return how many were resolved."""
    cp = checkpoints.get(st, RESOLVER_OWNER, RESOLVER_STREAM)
    after = int(cp.cursor.data.get("seq", 0)) if cp else 0
    generation = cp.generation if cp else 0
    entries = journal.read_pending(st, after, limit, formats=ROW_FORMATS)
    if not entries:
        return 0
    started = time.monotonic()
    fates: dict[str, int] = {}
    arrived: set[str] = set()
    with st.write_txn():
        view = StoreView(st)
        rows = []
        for entry in entries:
            decision = resolver.resolve(entry, view)
            apply_decision(st, entry, decision)
            rows.append((entry.seq, decision.fate, decision.detail))
            fates[decision.fate] = fates.get(decision.fate, 0) + 1
            if decision.entity and decision.canonical_id:
                arrived.add(f"{decision.entity}:{decision.canonical_id}")
                arrived.update(f"{decision.entity}:{v}" for _f, v in decision.natural)
        journal.set_fate(st, rows)
        position = Cursor({"v": 1, "seq": entries[-1].seq})
        if (
            checkpoints.advance(st, RESOLVER_OWNER, RESOLVER_STREAM, position, expected_generation=generation)
            is None
        ):
            raise CheckpointMovedError("the resolver was rewound while resolving; the batch is rolled back")
    log_event(
        logger,
        "resolve_batch",
        n=len(entries),
        last_seq=entries[-1].seq,
        ms=round((time.monotonic() - started) * 1000),
        **{f"fate_{k}": v for k, v in sorted(fates.items())},
    )
    release_blocked(st, resolver, arrived)
    return len(entries)


def apply_decision(st: State, entry: JournalEntry, d: Decision) -> None:
    """Write one decision's effects: links, shadow, natural keys, ops, exceptions, audit."""
    c = entry.change
    if d.entity and d.canonical_id:
        if d.link:
            xref.link(st, d.entity, d.canonical_id, d.link[0], d.link[1])
        if d.seen:
            shadow.put(
                st, d.entity, d.canonical_id, d.seen, system=c.source, by_agent=False, source_ts=c.source_ts
            )
        for fname, value in d.natural:
            xref.note_natural(st, d.entity, fname, value, d.canonical_id)
    if d.ops:
        outbox.enqueue(st, d.ops)
    runner.record_instances(st, entry, d)
    for p in d.problems:
        if p.instance_key:
            continue  # opened with its workflow instance
        open_problem(
            st, p, c, trace_id=c.trace_id, entity=d.entity, canonical_id=d.canonical_id, journal_seq=entry.seq
        )
    for a in d.audits:
        audit.record(
            st,
            a.action,
            trace_id=c.trace_id,
            entity=d.entity,
            canonical_id=d.canonical_id,
            detail=dict(a.detail),
        )
    if d.problems:
        log_event(
            logger,
            "change_parked",
            seq=entry.seq,
            trace_id=c.trace_id,
            entity=d.entity,
            reasons=",".join(p.reason for p in d.problems),
            level=logging.WARNING,
        )


def reresolve(st: State, resolver: Resolver, seq: int) -> Decision | None:
    """Resolve one journal entry again (an operator's or the parked-item retry)."""
    row = journal.get(st, seq, formats=ROW_FORMATS)
    if row is None:
        return None
    with st.write_txn():
        view = StoreView(st)
        if resolver.workflows is not None and runner.parked_at(st, seq):
            # A parked workflow instance: re-run its workflows on the record as known now.
            decision = resolver.workflows.reevaluate(resolver, row.entry, view)
        else:
            decision = resolver.resolve(row.entry, view)
        apply_decision(st, row.entry, decision)
        journal.set_fate(st, [(seq, decision.fate, decision.detail)])
    return decision


_RETRY_KINDS = ("dependency", "validation")


def retry_parked(
    st: State, resolver: Resolver, *, kinds: tuple[str, ...] = _RETRY_KINDS, limit: int = 200
) -> int:
    """Re-resolve open exception items of ``kinds``; close those whose cause has gone."""
    return _retry_items(st, resolver, exceptions.list_items(st, status="open", limit=limit), kinds)


def release_blocked(st: State, resolver: Resolver, arrived: set[str]) -> int:
    """Retry the parked items whose ``blocking_ref`` names a record that just arrived or changed.

    ``arrived`` holds ``entity:canonical id`` and ``entity:natural key`` references, such
    as ``tax_code:DE-VAT7`` once that tax code has been captured from the ERP.
    """
    if not arrived:
        return 0
    waiting = [i for i in exceptions.blocked_on(st, "") if i.blocking_ref in arrived]
    return _retry_items(st, resolver, waiting, _RETRY_KINDS) if waiting else 0


def _retry_items(st: State, resolver: Resolver, items: list[ExceptionItem], kinds: tuple[str, ...]) -> int:
    closed = 0
    outcomes: dict[int, Decision | None] = {}
    for item in items:
        if item.kind not in kinds or item.journal_seq is None:
            continue
        if item.journal_seq not in outcomes:
            outcomes[item.journal_seq] = reresolve(st, resolver, item.journal_seq)
        decision = outcomes[item.journal_seq]
        if decision is not None and not any(p.reason == item.reason for p in decision.problems):
            exceptions.resolve(st, item.id, actor="agent", resolution=f"retried: {decision.fate}")
            closed += 1
    if closed:
        log_event(logger, "parked_released", n=closed)
    return closed


# --- deliver -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeliverResult:
    """What one delivery batch did."""

    target: str
    applied: int
    retried: int
    rejected: int


def deliver(
    sink: Sink,
    st: State,
    resolver: Resolver,
    *,
    policy: RetryPolicy,
    limit: int = 200,
    clock: Callable[[], datetime] = utcnow,
    lookup: Lookup | None = None,
) -> DeliverResult:
    """Apply due ops for one target and record every outcome with its xref and shadow.

    ``lookup`` reads the target by id, so that ops whose earlier attempt may have landed
    are first checked against it (``agent.resend``).
    """
    now = clock()
    claimed = outbox.claim_due(st, sink.name, now=now, limit=limit)
    if not claimed:
        return DeliverResult(sink.name, 0, 0, 0)
    claimed = [narrow_replayed_first_copy(st, resolver, op) for op in claimed]
    try:
        checked = verify_in_doubt(st, resolver, lookup, claimed)
    except RetryableError as exc:
        _retry_all(st, claimed, exc, policy, now, sent=False)
        raise
    ops = checked.send
    outbox.mark_sending(st, [_id(op) for op in ops])
    try:
        outcomes = sink.apply(ops) if ops else []
    except RetryableError as exc:
        _retry_all(st, ops, exc, policy, now)
        raise
    except PermanentError:
        raise
    if len(outcomes) != len(ops):
        raise PermanentError(f"sink {sink.name} returned {len(outcomes)} outcomes for {len(ops)} ops")
    applied = retried = rejected = 0
    arrived: set[str] = set()
    with st.write_txn():
        for op, out in [*checked.settled, *zip(ops, outcomes, strict=True)]:
            if out.status == "applied":
                arrived.update(_applied(st, resolver, op, out))
                applied += 1
            elif out.status == "retry" and not policy.exhausted(op.attempts + 1):
                outbox.mark_retry(
                    st,
                    _id(op),
                    reason=out.reason or "retry",
                    next_attempt_at=policy.next_attempt_at(now, op.attempts + 1, retry_after=out.retry_after),
                )
                retried += 1
            else:
                _rejected(st, op, out)
                rejected += 1
    log_event(
        logger,
        "deliver_batch",
        target=sink.name,
        n=len(ops),
        applied=applied,
        retried=retried,
        rejected=rejected,
    )
    release_blocked(st, resolver, arrived)
    return DeliverResult(sink.name, applied, retried, rejected)


def _id(op: Op) -> int:
    assert op.op_id is not None, "ops from the outbox carry their op_id"
    return op.op_id


def _retry_all(
    st: State, ops: list[Op], exc: RetryableError, policy: RetryPolicy, now: datetime, *, sent: bool = True
) -> None:
    retry_after = retry_after_of(exc)
    # A rate limit refuses the request; a timeout, a 5xx or a dropped connection may not have.
    outcome: Literal["refused", "unknown", "not_sent"] = (
        "not_sent" if not sent else "refused" if isinstance(exc, RateLimited) else "unknown"
    )
    with st.write_txn():
        for op in ops:
            outbox.mark_retry(
                st,
                _id(op),
                reason=type(exc).__name__,
                next_attempt_at=policy.next_attempt_at(now, op.attempts + 1, retry_after=retry_after),
                outcome=outcome,
            )
    log_event(
        logger,
        "deliver_deferred",
        target=ops[0].target,
        n=len(ops),
        error=type(exc).__name__,
        retry_after=retry_after,
        level=logging.WARNING,
    )


def _applied(st: State, resolver: Resolver, op: Op, out: Outcome) -> list[str]:
    outbox.mark_applied(st, _id(op), out.external_id or "", out.version)
    arrived: list[str] = []
    if op.action == "unit":
        arrived = runner.applied_unit(st, resolver.config, op, out)
    elif op.action == "upsert" and out.external_id:
        try:
            linked = xref.link(st, op.entity, op.canonical_id, op.target, out.external_id)
        except DataError as exc:
            _link_conflict(st, op, out, exc)
            linked = False
        # A first copy writes its id back even when the link already existed: after a crash
        # between apply and record, the target's echo may have linked it first.
        if linked or is_first_copy(resolver.config, op):
            members = xref.members(st, op.entity, op.canonical_id)
            outbox.enqueue(st, writeback_ops(resolver.config, op, out.external_id, members))
    if op.canonical and op.action != "unit":
        shadow.put(
            st,
            op.entity,
            op.canonical_id,
            op.canonical,
            system=op.target,
            by_agent=True,
            source_ts=out.written_at,
        )
    if op.source_seq is not None:
        journal.set_fate(st, [(op.source_seq, "applied", f"{op.target}:{out.external_id}")])
    runner.step_done(st, op, out)
    return arrived


def _link_conflict(st: State, op: Op, out: Outcome, exc: DataError) -> None:
    """The target answered with an id other than the one already linked: a duplicate to review."""
    exceptions.open_item(
        st,
        kind="xref_conflict",
        reason="linked_to_another_record",
        detail=str(exc),
        trace_id=op.trace_id,
        source=op.target,
        entity=op.entity,
        canonical_id=op.canonical_id,
        record={"object": op.object_name, "key": dict(op.key), "external_id": out.external_id},
        op_id=op.op_id,
        journal_seq=op.source_seq,
    )
    log_event(
        logger, "xref_conflict", target=op.target, op_id=op.op_id, trace_id=op.trace_id, level=logging.WARNING
    )


def _rejected(st: State, op: Op, out: Outcome) -> None:
    reason = out.reason or "rejected"
    outbox.mark_rejected(st, _id(op), reason)
    runner.rejected(st, op, reason)
    exceptions.open_item(
        st,
        kind="rejected_by_target",
        reason=reason,
        detail=out.detail or reason,
        trace_id=op.trace_id,
        source=op.target,
        entity=op.entity,
        canonical_id=op.canonical_id,
        record={"object": op.object_name, "key": dict(op.key), "fields": dict(op.fields)},
        field=out.field_name,
        journal_seq=op.source_seq,
        op_id=op.op_id,
    )
    if op.source_seq is not None:
        journal.set_fate(st, [(op.source_seq, "exception", f"{op.target}: {reason}")])
    log_event(
        logger,
        "op_rejected",
        target=op.target,
        op_id=op.op_id,
        trace_id=op.trace_id,
        reason=reason,
        field=out.field_name,
        level=logging.WARNING,
    )


def _cursor_text(cursor: Cursor | None) -> str:
    if cursor is None:
        return "-"
    return ",".join(f"{k}={v}" for k, v in cursor.data.items() if k != "v")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None

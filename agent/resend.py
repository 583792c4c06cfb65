"""Read the target before resending an op whose earlier attempt may have landed.

A write that timed out, met a 5xx, or was cut short by a crash may have been applied. Sent
again blindly, it would overwrite whatever the target's users changed since: an edit the
agent might never see, because the resend leaves the record holding the agent's own value,
which then reads as an echo. So an op in doubt is first compared, field by field, with the
record as the target holds it now:

- the op's value: the earlier attempt landed; sending it again changes nothing;
- the value the op was built to replace (its ``base``): it did not land; send it;
- anything else: the target changed it after the earlier attempt; leave it out, and let
  capture bring that edit to the resolver, where ownership decides as for any other edit.

A first copy (keyed by external id) is looked up by that id when the target can (a
``FieldLookup``); found, the record exists, so none of its values is overwritten by the
copy's first values. An op with nothing left to send is answered as applied without a call.
A first copy replayed after a crash is also narrowed by what capture has already seen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agent.logging import log_event
from agent.model import Op, Outcome
from agent.reconcile import Lookup
from agent.resolve import Resolver
from agent.writeback import is_first_copy, without_fields
from state import outbox, shadow, xref
from state.db import State

logger = logging.getLogger(__name__)

_MISSING = object()


@runtime_checkable
class FieldLookup(Protocol):
    """Optional connector capability: read the current records of an object by an external id."""

    def fetch_by(
        self, object_name: str, field: str, values: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """Return ``{value: native record}``; ``None`` where no record holds the value."""
        ...


@dataclass(frozen=True, slots=True)
class Verified:
    """The ops to send (narrowed where the target moved on) and those settled without a call."""

    send: list[Op]
    settled: list[tuple[Op, Outcome]]


@dataclass(frozen=True, slots=True)
class _Found:
    tid: str
    native: Mapping[str, Any]


def verify_in_doubt(st: State, resolver: Resolver, lookup: Lookup | None, ops: Sequence[Op]) -> Verified:
    """Narrow each upsert in doubt to the fields the target still lacks, reading it first.

    Raises whatever the lookup raises (a ``RetryableError`` makes the whole batch wait).
    """
    doubtful = [op for op in ops if op.in_doubt and op.action == "upsert" and op.op_id is not None]
    if lookup is None or not doubtful:
        return Verified(list(ops), [])
    found = _read(st, resolver, lookup, doubtful)
    send: list[Op] = []
    settled: list[tuple[Op, Outcome]] = []
    # Per record, what the ops sent before in this batch will have written: a later op of the
    # same record replaces those values, not the ones read.
    ahead: dict[tuple[str, str], dict[str, Any]] = {}
    for op in ops:
        record = (op.entity, op.canonical_id)
        hit = found.get(id(op))
        if hit is None:
            send.append(op)  # not found: the sink's own upsert rules apply (a create, or record_deleted)
            ahead.setdefault(record, {}).update(op.canonical)
            continue
        narrowed, moved, landed = _narrow(st, resolver, op, hit, ahead.get(record, {}))
        if moved:
            log_event(
                logger,
                "resend_narrowed",
                target=op.target,
                entity=op.entity,
                op_id=op.op_id,
                fields=",".join(sorted(moved)),
            )
        if not set(narrowed.canonical) - landed and _plain_landed(resolver, narrowed, hit.native):
            settled.append((narrowed, Outcome.applied(hit.tid)))
        else:
            send.append(narrowed)
            ahead.setdefault(record, {}).update(narrowed.canonical)
    return Verified(send, settled)


def _read(st: State, resolver: Resolver, lookup: Lookup, ops: Sequence[Op]) -> dict[int, _Found]:
    """The target's current record of each op, by its id, or by its external id for a first copy."""
    by_id: dict[str, set[str]] = {}
    by_ext: dict[tuple[str, str], set[str]] = {}
    wants: dict[int, tuple[str, str, str | None]] = {}
    for op in ops:
        m = resolver.config.entities[op.entity].systems[op.target]
        tid = xref.external_id(st, op.entity, op.canonical_id, op.target)
        if tid is not None:
            by_id.setdefault(op.object_name, set()).add(tid)
            wants[id(op)] = (op.object_name, tid, None)
        elif m.external_id and m.external_id in op.key and isinstance(lookup, FieldLookup):
            value = str(op.key[m.external_id])
            by_ext.setdefault((op.object_name, m.external_id), set()).add(value)
            wants[id(op)] = (op.object_name, value, m.external_id)
    records: dict[tuple[str, str, str | None], dict[str, Any] | None] = {}
    for object_name, tids in by_id.items():
        for tid, rec in lookup.fetch(object_name, sorted(tids)).items():
            records[(object_name, tid, None)] = rec
    for (object_name, field), values in by_ext.items():
        assert isinstance(lookup, FieldLookup)
        for value, rec in lookup.fetch_by(object_name, field, sorted(values)).items():
            records[(object_name, value, field)] = rec
    out: dict[int, _Found] = {}
    for op in ops:
        want = wants.get(id(op))
        rec = records.get(want) if want else None
        if want is None or rec is None:
            continue
        key = resolver.config.entities[op.entity].systems[op.target].key
        tid = want[1] if want[2] is None else rec.get(key)
        if tid is not None:
            out[id(op)] = _Found(str(tid), rec)
    return out


def _narrow(
    st: State, resolver: Resolver, op: Op, hit: _Found, ahead: Mapping[str, Any]
) -> tuple[Op, set[str], set[str]]:
    """The op without the fields the target changed since; those fields; and the ones that landed."""
    read, _unreadable = resolver.mapper(op.entity).readable(
        op.target,
        hit.native,
        record=f"{op.target}:{op.object_name}:{hit.tid}",
        refs=lambda entity, system, value: xref.lookup(st, entity, system, str(value)),
    )
    now = {**read, **ahead}
    # A first copy: keyed by external id, built against nothing (a follow-up queued behind it
    # has a base), however the record was found now.
    first_copy = not op.base and is_first_copy(resolver.config, op)
    moved: set[str] = set()
    landed: set[str] = set()
    for name, ours in op.canonical.items():
        held = now.get(name, _MISSING)
        if held is _MISSING:
            continue  # unreadable here: sent as it is
        if held == ours:
            landed.add(name)
        elif first_copy or (name in op.base and held != op.base[name]):
            # Changed since the op was made; or a first copy (an op keyed by external id with no
            # base: a follow-up queued behind the first copy has one) meeting a record that exists.
            moved.add(name)
        # else: the target still holds what the op replaces (or nothing is known): it did not land
    return (without_fields(resolver.config, op, moved) if moved else op), moved, landed


def _plain_landed(resolver: Resolver, op: Op, native: Mapping[str, Any]) -> bool:
    """Whether the op's columns outside its canonical fields (an id written back) hold its values."""
    entity = resolver.config.entities[op.entity]
    mapped = {entity.fields[n].columns.get(op.target) for n in op.canonical if n in entity.fields}
    return all(
        column in native and str(native[column]) == str(value)
        for column, value in op.fields.items()
        if column not in mapped
    )


def narrow_replayed_first_copy(st: State, resolver: Resolver, op: Op) -> Op:
    """A first copy never overwrites a value the target changed after the op was made.

    A create applied but not recorded (a crash) comes again after a restart; meanwhile the
    target's record may have been edited and captured. Those fields are left out of it.
    """
    if op.action != "upsert" or op.op_id is None or op.base or not is_first_copy(resolver.config, op):
        return op  # (an op with a base is a follow-up queued behind the first copy, not the copy)
    if xref.external_id(st, op.entity, op.canonical_id, op.target) is None:
        return op
    row = outbox.get(st, op.op_id)
    if row is None:
        return op
    seen = shadow.get(st, op.entity, op.canonical_id, op.target)
    newer = {
        f
        for f, v in seen.items()
        if f in op.canonical
        and not v.written_by_agent
        and v.updated_at > row.created_at
        and v.value != op.canonical[f]
    }
    return without_fields(resolver.config, op, newer) if newer else op

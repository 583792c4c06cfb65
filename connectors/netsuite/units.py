"""The ``unit`` op on NetSuite: a forward-recovering saga of upserts by external id.

NetSuite's REST record service has no multi-record transaction, so a unit (customer,
contract, project: later steps naming earlier steps' ids as ``{"$step": n}``) cannot be
all or nothing. It is made safe to repeat instead:

- Every step is an upsert by a deterministic external id (``PUT .../eid:<value>``): a key
  on the record's external-id field, or on another column such as a project code, whose
  value then doubles as the external id and is written to that column too. A step keyed by
  the internal id (a customer already linked) is a ``PATCH``, or no request at all when it
  writes nothing. A repeat of the unit finds what an earlier attempt created.
- Every step is checked before the first write (the record type is configured, the key is
  usable as an eid, required fields are there, fields are known columns, ``$step`` points
  backwards), so most refusals happen while nothing exists yet.
- A throttle, 5xx or network failure at step n raises (the writer answers ``retry``); the
  ids of steps before n are remembered by the op's idempotency key, so the retry in this
  process continues at step n. After a restart the earlier steps are upserted again, which
  finds them.
- A permanent refusal at step n answers ``reject`` whose detail names the step and lists the
  records already in NetSuite, with their ids: they are kept, not deleted (a finance record
  may already be referenced, and a delete is no safer to retry than the create was). The
  operator fixes the cause and retries the exception: the replay finds them and goes on.

``Plan`` holds the checked steps; ``UnitRunner.run`` walks them through a step writer.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from agent.model import Op, Outcome

if TYPE_CHECKING:
    from connectors.netsuite.client import NsRecord

EID = re.compile(r"[A-Za-z0-9_\-]+\Z")
_MEMO_SIZE = 256
_SYSTEM_COLUMNS = frozenset({"id", "lastmodifieddate", "datecreated"})


@dataclass(frozen=True, slots=True)
class Step:
    """One checked step: its record, how it is addressed, and its (unfilled) key and fields."""

    index: int
    record: NsRecord
    column: str  # "id", the external-id field, or a natural-key column
    value: Any  # the key value, possibly {"$step": n}
    fields: Mapping[str, Any]

    @property
    def where(self) -> str:
        """The step as an operator reads it: ``step 2 (job)``."""
        return f"step {self.index} ({self.record.record_type})"

    def op(self, unit: Op, ids: Sequence[str]) -> Op | None:
        """The upsert this step sends, its ``$step`` values filled in; None when it needs no request."""
        value = _fill(self.value, ids)
        fields = {c: _fill(v, ids) for c, v in self.fields.items()}
        rec = self.record
        if self.column == "id":
            if not fields:
                return None
            key: dict[str, Any] = {"id": value}
        else:
            key = {rec.external_id_field: value}
            if self.column != rec.external_id_field:
                fields[self.column] = value
        return replace(unit, object_name=rec.record_type, action="upsert", key=key, fields=fields)


def plan(op: Op, record_for: Callable[[str], NsRecord | None]) -> list[Step] | Outcome:
    """Check every step of a unit op before anything is written; the steps, or the reject."""
    steps = op.fields.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, Mapping) for s in steps):
        return Outcome.reject("invalid_unit", "a unit op needs fields.steps: a list of upserts")
    out: list[Step] = []
    for n, raw in enumerate(steps):
        where = f"step {n} ({raw.get('object')})"
        record = record_for(str(raw.get("object")))
        if record is None:
            return _refused("UNKNOWN_RECORD", f"{where}: no NetSuite record is configured for it", None)
        key, fields = raw.get("key"), raw.get("fields")
        if not isinstance(key, Mapping) or not isinstance(fields, Mapping):
            return _refused("invalid_unit", f"{where}: key and fields must be objects", None)
        if len(key) != 1:
            return _refused("MISSING_KEY", f"{where}: the key must name exactly one column", None)
        ((column, value),) = key.items()
        problem = _check_refs(n, where, {column: value, **fields}) or _check_key(where, column, value)
        if problem is None:
            problem = _check_fields(where, record, column, fields)
        if problem is not None:
            return problem
        out.append(Step(n, record, column, value, dict(fields)))
    return out


def _check_refs(n: int, where: str, values: Mapping[str, Any]) -> Outcome | None:
    for column, value in values.items():
        if _is_ref(value) and not (isinstance(value["$step"], int) and 0 <= value["$step"] < n):
            return _refused(
                "bad_step_reference", f"{where}: refers to step {value['$step']}, not before it", column
            )
    return None


def _check_key(where: str, column: str, value: Any) -> Outcome | None:
    if value is None or value == "":
        return _refused("MISSING_KEY", f"{where}: the key {column} has no value", column)
    if _is_ref(value):
        return None
    if column == "id" and not str(value).isdigit():
        return _refused("INVALID_KEY", f"{where}: the internal id is not numeric", column)
    if column != "id" and not EID.match(str(value)):
        return _refused(
            "INVALID_KEY", f"{where}: an external id may hold only letters, digits, _ and -", column
        )
    return None


def _check_fields(where: str, record: NsRecord, column: str, fields: Mapping[str, Any]) -> Outcome | None:
    known = {*record.fields, record.external_id_field, *record.rest_names, "id"}
    if column not in known:
        return _refused("UNKNOWN_FIELD", f"{where}: the key column {column} is not mapped", column)
    for name in fields:
        if name not in known or name in _SYSTEM_COLUMNS:
            return _refused("UNKNOWN_FIELD", f"{where}: {name} is not a writable mapped column", name)
    if column != "id":  # by external id: this may create the record, so NetSuite's mandatory fields
        for name in sorted(record.required):
            if name != column and fields.get(name) in (None, ""):
                return _refused("MISSING_REQUIRED", f"{where}: {name} is required", name)
    return None


class UnitRunner:
    """Runs unit ops step by step, remembering finished steps of a unit that must retry."""

    def __init__(self) -> None:
        self._done: OrderedDict[str, list[str]] = OrderedDict()

    def run(self, op: Op, steps: Sequence[Step], write: Callable[[Op], Outcome]) -> Outcome:
        """Apply ``steps`` in order through ``write``; retryable failures raise (ids are kept)."""
        ids = list(self._done.pop(op.idempotency_key, []))[: len(steps)]
        for step in steps[len(ids) :]:
            sub = step.op(op, ids)
            try:
                result = Outcome.applied(str(_fill(step.value, ids))) if sub is None else write(sub)
            except BaseException:
                self._remember(op.idempotency_key, ids)
                raise
            if result.status == "retry":
                self._remember(op.idempotency_key, ids)
                return result
            if result.status != "applied" or not result.external_id:
                return _rejected_at(step, steps, ids, result)
            ids.append(result.external_id)
        return Outcome.applied(json.dumps(ids))

    def _remember(self, key: str, ids: list[str]) -> None:
        if not ids:
            return
        self._done[key] = ids
        while len(self._done) > _MEMO_SIZE:
            self._done.popitem(last=False)


def _rejected_at(step: Step, steps: Sequence[Step], ids: Sequence[str], result: Outcome) -> Outcome:
    kept = ", ".join(
        f"step {s.index} {s.record.record_type} id {i}" for s, i in zip(steps, ids, strict=False)
    )
    done = f"already in NetSuite, kept: {kept}" if kept else "nothing of the unit was written"
    detail = f"{step.where}: {result.detail or result.reason}; {done}"
    return Outcome.reject(result.reason or "rejected", detail, result.field_name)


def _refused(reason: str, detail: str, field: str | None) -> Outcome:
    return Outcome.reject(reason, f"{detail}; nothing of the unit was written", field)


def _is_ref(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"$step"}


def _fill(value: Any, ids: Sequence[str]) -> Any:
    return ids[value["$step"]] if _is_ref(value) else value

"""Salesforce write planning without I/O: ops into sObject Collections requests, results into outcomes.

An op keyed by ``Id`` (the cross-reference knows the record) becomes a Collections update;
an op keyed by one other field becomes a Collections upsert on that external-id field; a
delete needs the ``Id`` (the connector looks external ids up first). Requests hold at most
200 records of one object, as Collections require.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from agent.model import Op, Outcome
from connectors.salesforce.source import is_identifier

MAX_RECORDS = 200
WriteKind = Literal["upsert", "update", "delete"]

# Row errors that a later attempt can succeed on; everything else is the record's fault.
RETRY_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "ALL_OR_NONE_OPERATION_ROLLED_BACK", "SERVER_UNAVAILABLE"})
# A delete whose record is already gone has reached its goal (replays must be no-ops).
GONE_CODES = frozenset({"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY", "NOT_FOUND"})


@dataclass(frozen=True, slots=True)
class WriteTarget:
    """Where one op goes: the kind of write, the object, the key field and value."""

    kind: WriteKind
    object_name: str
    key_field: str
    key_value: str


@dataclass(frozen=True, slots=True)
class WriteRequest:
    """One Collections request: up to 200 records (or ids) of one object, with op indexes."""

    kind: WriteKind
    object_name: str
    key_field: str
    indexes: tuple[int, ...]
    records: tuple[Mapping[str, Any], ...] = ()
    ids: tuple[str, ...] = ()


def target_of(op: Op) -> WriteTarget | Outcome:
    """Decide how ``op`` is written, or reject it when its key cannot address a record."""
    if len(op.key) != 1:
        return Outcome.reject("INVALID_KEY", f"op key needs exactly one field, got {len(op.key)}")
    ((field, value),) = op.key.items()
    if not is_identifier(field) or "." in field or not is_identifier(op.object_name):
        return Outcome.reject("INVALID_KEY", "object or key field is not a Salesforce API name")
    if value is None or value == "":
        return Outcome.reject("INVALID_KEY", f"key field {field} is empty", field)
    by_id = field.lower() == "id"
    if op.action == "delete":
        return WriteTarget("delete", op.object_name, "Id" if by_id else field, str(value))
    return WriteTarget("update" if by_id else "upsert", op.object_name, "Id" if by_id else field, str(value))


def record_body(op: Op, target: WriteTarget) -> dict[str, Any]:
    """The Collections record for an upsert or update: attributes, key, then the fields."""
    fields = {k: v for k, v in op.fields.items() if k.lower() not in ("id", target.key_field.lower())}
    record: dict[str, Any] = {"attributes": {"type": target.object_name}}
    if target.kind == "update":
        record["id"] = target.key_value
    else:
        record[target.key_field] = target.key_value
    record.update(fields)
    return record


def plan_writes(
    ops: Sequence[Op], targets: Mapping[int, WriteTarget], delete_ids: Mapping[int, str]
) -> list[WriteRequest]:
    """Group planned ops by (kind, object, key field) into requests of at most 200, keeping order.

    Ops of one record must land in the order they were queued: grouping alone would send, say,
    a record's update by Id before its earlier upsert by external id. So each record appears
    at most once per wave of requests; its next op opens the next wave.
    """
    waves: list[dict[tuple[WriteKind, str, str], list[int]]] = []
    wave_of: dict[tuple[str, str], int] = {}
    for index, target in sorted(targets.items()):
        if target.kind == "delete" and index not in delete_ids:
            continue
        key_field = "Id" if target.kind == "delete" else target.key_field
        record = (ops[index].entity, ops[index].canonical_id)
        n = wave_of.get(record, -1) + 1
        wave_of[record] = n
        if n == len(waves):
            waves.append({})
        waves[n].setdefault((target.kind, target.object_name, key_field), []).append(index)
    requests: list[WriteRequest] = []
    for groups in waves:
        for (kind, object_name, key_field), indexes in groups.items():
            for start in range(0, len(indexes), MAX_RECORDS):
                chunk = tuple(indexes[start : start + MAX_RECORDS])
                if kind == "delete":
                    ids = tuple(delete_ids[i] for i in chunk)
                    requests.append(WriteRequest(kind, object_name, key_field, chunk, ids=ids))
                else:
                    records = tuple(record_body(ops[i], targets[i]) for i in chunk)
                    requests.append(WriteRequest(kind, object_name, key_field, chunk, records=records))
    return requests


def outcome_of(kind: WriteKind, result: Mapping[str, Any]) -> Outcome:
    """Map one per-record Collections result to an outcome."""
    record_id = result.get("id")
    if result.get("success") is True:
        detail = None
        if kind == "upsert":
            detail = "created" if result.get("created") else "updated"
        return Outcome("applied", external_id=str(record_id) if record_id else None, detail=detail)
    errors = result.get("errors") or [{}]
    first = errors[0] if isinstance(errors[0], Mapping) else {}
    code = str(first.get("statusCode") or "UNKNOWN_ERROR")
    if code in RETRY_CODES:
        return Outcome.retry(None, code)
    if kind == "delete" and code in GONE_CODES:
        return Outcome("applied", external_id=str(record_id) if record_id else None, detail="already deleted")
    fields = first.get("fields") or []
    field_name = str(fields[0]) if fields else None
    return Outcome.reject(code, str(first.get("message") or code), field_name)

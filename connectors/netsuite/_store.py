"""The NetSuite emulator's records: schema of four record types, rows, deletions, validation.

An account may add custom record types (``customrecord_contract``: a ``name``, its own
``custrecord_*`` fields and id sequence, SuiteQL table and REST type of the same name) and
custom fields on standard records (``custentity_*`` on a job); custom fields keep their id
as their REST name, as NetSuite does.

Rows are keyed by SuiteQL column names (lower case); the REST side names the same fields in
camelCase, and a few differ outright (a payment's ``customer`` is the ``entity`` column, an
invoice's ``total`` is ``foreigntotal``). Entities (customers, jobs) share one id sequence
and transactions (invoices, payments) another, as in NetSuite, so a customer and an invoice
can have the same internal id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from connectors.netsuite._suiteql import SuiteQLError


@dataclass(frozen=True, slots=True)
class _Field:
    column: str
    rest: str
    kind: str = "text"  # text | ref | number | date | bool
    ref_to: tuple[str, ...] = ()


def _f(column: str, rest: str | None = None, kind: str = "text", *ref_to: str) -> _Field:
    return _Field(column, rest or column, kind, ref_to)


_SCHEMA: Mapping[str, tuple[_Field, ...]] = MappingProxyType(
    {
        "customer": (
            _f("entityid", "entityId"),
            _f("companyname", "companyName"),
            _f("email"),
            _f("subsidiary", None, "ref"),
            _f("currency", None, "ref"),
            _f("isinactive", "isInactive", "bool"),
        ),
        "job": (
            _f("entityid", "entityId"),
            _f("companyname", "companyName"),
            _f("parent", None, "ref", "customer"),
            _f("jobtype", "jobType", "ref"),
            _f("entitystatus", "entityStatus", "ref"),
            _f("percentcomplete", "percentComplete", "number"),
            _f("startdate", "startDate", "date"),
        ),
        "invoice": (
            _f("entity", None, "ref", "customer", "job"),
            _f("tranid", "tranId"),
            _f("trandate", "tranDate", "date"),
            _f("foreigntotal", "total", "number"),
            _f("status", None, "ref"),
            _f("currency", None, "ref"),
        ),
        "customerpayment": (
            _f("entity", "customer", "ref", "customer"),
            _f("tranid", "tranId"),
            _f("trandate", "tranDate", "date"),
            _f("foreigntotal", "payment", "number"),
            _f("appliedinvoice", "apply", "ref", "invoice"),
            _f("currency", None, "ref"),
        ),
    }
)
_FAMILY = MappingProxyType(
    {"customer": "entity", "job": "entity", "invoice": "transaction", "customerpayment": "transaction"}
)
_TRAN_TYPE = MappingProxyType({"invoice": "CustInvc", "customerpayment": "CustPymt"})
_TABLES = MappingProxyType(
    {"customer": ("customer",), "job": ("job",), "transaction": ("invoice", "customerpayment")}
)
_SYSTEM = ("id", "externalid", "datecreated", "lastmodifieddate")
_KINDS = ("text", "ref", "number", "date", "bool")
_DELETED_COLUMNS = ("id", "recordid", "type", "deleteddate", "externalid")


class Rejected(Exception):
    """A request NetSuite would refuse: status, error code, detail and the field it names."""

    def __init__(self, status: int, code: str, detail: str, path: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.path = path


class RecordStore:
    """Rows of customer, job, invoice and customerpayment, plus the deleted-records log."""

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self._schema: dict[str, tuple[_Field, ...]] = dict(_SCHEMA)
        self._family: dict[str, str] = dict(_FAMILY)
        self._tables: dict[str, tuple[str, ...]] = dict(_TABLES)
        self._data: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in _SCHEMA}
        self._deleted: list[dict[str, Any]] = []
        self._next_id = {"entity": 100, "transaction": 100, "deleted": 1}
        self._required: dict[str, set[str]] = {t: set() for t in _SCHEMA}
        self._allowed: dict[tuple[str, str], frozenset[str]] = {}

    def define(self, rtype: str, fields: Mapping[str, str]) -> None:
        """Add a custom record type: a ``name`` plus ``fields`` (column -> kind, ``ref:customer``)."""
        if not rtype.startswith("customrecord") or rtype in self._schema:
            raise ValueError(f"a new custom record type needs a customrecord* id: {rtype!r}")
        self._schema[rtype] = (_f("name"), *self._custom(fields))
        self._family[rtype] = rtype
        self._tables[rtype] = (rtype,)
        self._data[rtype] = {}
        self._required[rtype] = set()
        self._next_id[rtype] = 1

    def add_fields(self, rtype: str, fields: Mapping[str, str]) -> None:
        """Add custom fields (column -> kind) to an existing record type."""
        known = {f.column for f in self._schema[self.record_type(rtype)]}
        added = tuple(f for f in self._custom(fields) if f.column not in known)
        self._schema[rtype] = (*self._schema[rtype], *added)

    def _custom(self, fields: Mapping[str, str]) -> list[_Field]:
        out = []
        for column, kind in fields.items():
            base, _, targets = kind.partition(":")
            if not column.startswith("cust") or base not in _KINDS:
                raise ValueError(f"a custom field needs a cust* id and a kind of {_KINDS}: {column!r}")
            out.append(_f(column, column, base, *(t for t in targets.split(",") if t)))
        return out

    def record_type(self, name: str) -> str:
        """Return the canonical record type for a URL segment (case-insensitive) or reject."""
        rtype = name.lower()
        if rtype not in self._schema:
            raise Rejected(404, "NONEXISTENT_ID", f"Record type {name} does not exist.")
        return rtype

    def table(self, name: str) -> tuple[list[dict[str, Any]], list[str]]:
        """Return the rows and column names behind a SuiteQL table."""
        if name == "deletedrecord":
            return list(self._deleted), list(_DELETED_COLUMNS)
        types = self._tables.get(name)
        if types is None:
            raise SuiteQLError(f"Invalid search query. Unknown table '{name}'.")
        columns = list(_SYSTEM) + (["type"] if name == "transaction" else [])
        for t in types:
            columns += [f.column for f in self._schema[t] if f.column not in columns]
        return [row for t in types for row in self._data[t].values()], columns

    def ids(self, rtype: str) -> list[int]:
        """Return the internal ids of ``rtype`` in order."""
        return sorted(self._data[rtype])

    def find(self, rtype: str, ref: str) -> int | None:
        """Resolve ``4711`` or ``eid:C-1`` to an existing internal id."""
        if ref.startswith("eid:"):
            for rid, row in self._data[rtype].items():
                if row.get("externalid") == ref[4:]:
                    return rid
            return None
        return int(ref) if ref.isdigit() and int(ref) in self._data[rtype] else None

    def fields_from_body(self, rtype: str, body: Any, *, strict: bool) -> dict[str, Any]:
        """Turn a REST body into column values; unknown properties fail only when ``strict``."""
        if not isinstance(body, dict):
            raise Rejected(400, "INVALID_CONTENT", "The request body must be a JSON object.")
        by_rest = {f.rest: f for f in self._schema[rtype]}
        fields: dict[str, Any] = {}
        for prop, value in body.items():
            if prop == "externalId":
                fields["externalid"] = None if value is None else str(value)
                continue
            spec = by_rest.get(prop)
            if spec is None:
                if strict:
                    raise Rejected(400, "INVALID_CONTENT", f"Invalid field name {prop}.", prop)
                continue
            fields[spec.column] = _convert(spec, value)
        return fields

    def save(self, rtype: str, rid: int | None, fields: Mapping[str, Any]) -> int:
        """Validate and write: create when ``rid`` is None, else update; returns the id."""
        current = self._data[rtype].get(rid, {}) if rid is not None else {}
        self._validate(rtype, {**current, **fields})
        if rid is None:
            return int(self.insert(rtype, fields))
        self.update(rtype, str(rid), fields)
        return rid

    def _validate(self, rtype: str, row: Mapping[str, Any]) -> None:
        for spec in self._schema[rtype]:
            value = row.get(spec.column)
            if spec.column in self._required[rtype] and value in (None, ""):
                raise Rejected(400, "USER_ERROR", f"Please enter value(s) for: {spec.rest}.", spec.rest)
            allowed = self._allowed.get((rtype, spec.column))
            if allowed is not None and value is not None and str(value) not in allowed:
                raise Rejected(400, "USER_ERROR", f"Invalid value for the field {spec.rest}.", spec.rest)
            if spec.ref_to and value is not None and self._ref_row(spec, str(value)) is None:
                raise Rejected(400, "USER_ERROR", f"Invalid reference in the field {spec.rest}.", spec.rest)

    def rest_body(self, rtype: str, rid: int, href: str) -> dict[str, Any]:
        """Render a record the REST way: camelCase, ``{id, refName}`` refs, ISO dates in UTC."""
        row = self._data[rtype][rid]
        body: dict[str, Any] = {"links": [{"rel": "self", "href": href}], "id": str(rid)}
        for column, rest in (
            ("externalid", "externalId"),
            ("datecreated", "dateCreated"),
            ("lastmodifieddate", "lastModifiedDate"),
        ):
            value = row.get(column)
            if value is not None:
                body[rest] = value.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(value, datetime) else value
        for spec in self._schema[rtype]:
            value = row.get(spec.column)
            if value is None:
                continue
            if spec.kind == "ref":
                target = self._ref_row(spec, str(value)) or {}
                name = target.get("companyname") or target.get("tranid") or target.get("name") or str(value)
                body[spec.rest] = {"id": str(value), "refName": str(name), "links": []}
            elif spec.kind == "date":
                body[spec.rest] = value.isoformat()
            else:
                body[spec.rest] = value
        return body

    def _ref_row(self, spec: _Field, value: str) -> dict[str, Any] | None:
        for t in spec.ref_to:
            row = self._data[t].get(int(value)) if value.isdigit() else None
            if row is not None:
                return row
        return None

    def require(self, rtype: str, column: str) -> None:
        """Make ``column`` mandatory on writes of ``rtype``."""
        self._required[rtype].add(column)

    def allow(self, rtype: str, column: str, values: tuple[str, ...]) -> None:
        """Accept only ``values`` for ``column`` on writes of ``rtype``."""
        self._allowed[(rtype, column)] = frozenset(values)

    def insert(self, rtype: str, fields: Mapping[str, Any], *, modified: datetime | None = None) -> str:
        """Create a record from column values, unvalidated; returns its internal id."""
        family = self._family[rtype]
        rid = self._next_id[family]
        self._next_id[family] += 1
        stamp = _second(modified or self._now())
        row: dict[str, Any] = {"id": rid, "datecreated": stamp, "lastmodifieddate": stamp}
        if rtype in _TRAN_TYPE:
            row["type"] = _TRAN_TYPE[rtype]
        row.update({k: v for k, v in fields.items() if k not in _SYSTEM or k == "externalid"})
        self._data[rtype][rid] = row
        return str(rid)

    def update(
        self, rtype: str, rid: str, fields: Mapping[str, Any], *, modified: datetime | None = None
    ) -> None:
        """Change column values and bump ``lastmodifieddate`` (every save does, as in NetSuite)."""
        row = self._data[rtype][int(rid)]
        row.update({k: v for k, v in fields.items() if k not in _SYSTEM or k == "externalid"})
        row["lastmodifieddate"] = _second(modified or self._now())

    def delete(self, rtype: str, rid: str, *, at: datetime | None = None) -> None:
        """Remove a record and log it in ``deletedrecord``."""
        row = self._data[rtype].pop(int(rid))
        seq = self._next_id["deleted"]
        self._next_id["deleted"] += 1
        self._deleted.append(
            {
                "id": seq,
                "recordid": int(rid),
                "type": rtype,
                "deleteddate": _second(at or self._now()),
                "externalid": row.get("externalid"),
            }
        )

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """Return a copy of one record's columns, or None."""
        row = self._data[rtype].get(int(rid))
        return dict(row) if row is not None else None

    def all(self, rtype: str) -> list[dict[str, Any]]:
        """Return copies of every record of ``rtype`` by internal id."""
        return [dict(self._data[rtype][k]) for k in sorted(self._data[rtype])]


def _convert(spec: _Field, value: Any) -> Any:
    if value is None:
        return None
    try:
        if spec.column == "appliedinvoice" and isinstance(value, dict) and "items" in value:
            applied = [i for i in value["items"] if isinstance(i, dict) and i.get("apply", True)]
            if not applied:
                return None
            value = applied[0]["doc"]
        if spec.kind == "ref":
            ref = value.get("id") if isinstance(value, dict) else value
            return None if ref is None else str(ref)
        if spec.kind == "number":
            return Decimal(str(value))
        if spec.kind == "date":
            return date.fromisoformat(str(value))
        if spec.kind == "bool":
            return value in (True, "T", "true")
        return str(value)
    except (ValueError, InvalidOperation, KeyError, TypeError, IndexError) as exc:
        raise Rejected(400, "USER_ERROR", f"Invalid value for the field {spec.rest}.", spec.rest) from exc


def _second(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)

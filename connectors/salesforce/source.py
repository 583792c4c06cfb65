"""Salesforce read logic without I/O: object config, SOQL building and quoting, cursors, records.

The read cursor is a keyset on ``(SystemModstamp, Id)``. While a walk is under way (the
batch limit cut it short) the cursor also carries ``upto``, the walk's signpost, and the
next read continues strictly after ``(ts, id)`` up to that signpost with no look-back.
When a walk reaches the signpost the cursor becomes ``{"ts": signpost, "id": ""}``, and the
next walk starts ``lookback`` before it, so late-committing rows are read again (their
positions repeat, and the journal's unique key absorbs them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.model import Change, Cursor
from connectors.base import content_digest

CURSOR_VERSION = 1
SYSTEM_FIELDS = ("Id", "SystemModstamp", "IsDeleted")

_IDENT = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z][A-Za-z0-9_]*)*\Z")
_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}


@dataclass(frozen=True, slots=True)
class SfObject:
    """One Salesforce object to read and write: its API name, fields and external-id field."""

    name: str
    fields: tuple[str, ...]
    external_id_field: str | None
    use_query_all: bool = True

    def __post_init__(self) -> None:
        for ident in (self.name, *self.fields, self.external_id_field):
            if ident is not None and not is_identifier(ident):
                raise ValueError(f"not a Salesforce API name: {ident!r}")
        if "." in self.name:
            raise ValueError(f"not an object name: {self.name!r}")

    def select_list(self) -> tuple[str, ...]:
        """The fields a read selects: the system fields, then the configured ones."""
        extra = [f for f in self.fields if f.lower() not in {s.lower() for s in SYSTEM_FIELDS}]
        return (*SYSTEM_FIELDS, *dict.fromkeys(extra))


@dataclass(frozen=True, slots=True)
class ReadPosition:
    """A decoded read cursor: keyset ``(ts, id)`` and, mid-walk, the walk's signpost."""

    ts: datetime | None
    id: str = ""
    upto: datetime | None = None

    def to_cursor(self) -> Cursor:
        """Encode as an opaque cursor ``{"v": 1, "ts": iso, "id": id[, "upto": iso]}``."""
        data: dict[str, Any] = {"v": CURSOR_VERSION, "ts": _iso(self.ts), "id": self.id}
        if self.upto is not None:
            data["upto"] = _iso(self.upto)
        return Cursor(data)

    @classmethod
    def from_cursor(cls, cursor: Cursor | None, *, start_at: datetime | None) -> ReadPosition:
        """Decode ``cursor`` (None: the configured start, or the very beginning)."""
        if cursor is None:
            return cls(ts=start_at)
        data = cursor.data
        if data.get("v") != CURSOR_VERSION:
            raise ValueError(f"unsupported Salesforce cursor version {data.get('v')!r}")
        ts, upto = data.get("ts"), data.get("upto")
        return cls(
            ts=parse_iso(ts) if ts else None,
            id=str(data.get("id") or ""),
            upto=parse_iso(upto) if upto else None,
        )


def is_identifier(name: str) -> bool:
    """Tell whether ``name`` is a plain (possibly dotted) Salesforce API name."""
    return bool(_IDENT.match(name))


def soql_quote(value: str) -> str:
    """Render ``value`` as a quoted SOQL string literal, escaping quotes and backslashes."""
    return "'" + "".join(_ESCAPES.get(ch, ch) for ch in value) + "'"


def soql_datetime(value: datetime) -> str:
    """Render an aware datetime as an (unquoted) SOQL datetime literal in UTC, whole seconds."""
    if value.tzinfo is None:
        raise ValueError("SOQL datetimes must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_query(
    obj: SfObject,
    *,
    after: tuple[datetime, str] | None,
    since: datetime | None,
    upto: datetime | None,
) -> str:
    """Build the change query: keyset after ``after`` (or from ``since``), up to ``upto``."""
    where: list[str] = []
    if after is not None:
        ts, last_id = soql_datetime(after[0]), soql_quote(after[1])
        where.append(f"(SystemModstamp > {ts} OR (SystemModstamp = {ts} AND Id > {last_id}))")
    elif since is not None:
        where.append(f"SystemModstamp >= {soql_datetime(since)}")
    if upto is not None:
        where.append(f"SystemModstamp <= {soql_datetime(upto)}")
    soql = f"SELECT {', '.join(obj.select_list())} FROM {obj.name}"
    if where:
        soql += " WHERE " + " AND ".join(where)
    return soql + " ORDER BY SystemModstamp, Id"


def parse_modstamp(value: str) -> datetime:
    """Parse a Salesforce datetime (``2024-05-01T12:34:56.000+0000``) into aware UTC."""
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z").astimezone(UTC)


def parse_iso(value: str) -> datetime:
    """Parse an ISO-8601 timestamp from a cursor into aware UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"cursor timestamp without a time zone: {value!r}")
    return parsed.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def record_to_change(
    source: str, stream: str, obj: SfObject, record: Mapping[str, Any]
) -> tuple[Change, datetime]:
    """Turn one queried record into a ``Change`` (update, or delete when IsDeleted)."""
    record_id = str(record["Id"])
    stamp_text = str(record["SystemModstamp"])
    stamp = parse_modstamp(stamp_text)
    # Only fields the payload carries: an absent field is unknown, not empty (a null clears it).
    fields = {f: record[f] for f in obj.fields if f in record}
    digest = content_digest({**fields, "IsDeleted": record.get("IsDeleted")})
    change = Change(
        source=source,
        stream=stream,
        object_name=obj.name,
        op="delete" if record.get("IsDeleted") is True else "update",
        key={"Id": record_id},
        fields=fields,
        position=f"{record_id}@{stamp_text}#{digest}",
        version=stamp_text,
        source_ts=stamp,
    )
    return change, stamp

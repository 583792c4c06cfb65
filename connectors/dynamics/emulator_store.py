"""The Dataverse emulator's tables: schemas, rows, row versions, tombstones and key lookups.

No HTTP here: ``DynamicsEmulator`` serves this store and holds its lock around every call.
Row values are kept as Python values (``modifiedon``/``createdon`` as UTC datetimes at whole
seconds, ``versionnumber`` as an int unique across the database, GUIDs as lower-case text).
A failure raises ``DataverseFault`` carrying the status and Dataverse error body to answer.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from connectors.dynamics.odata import ODataSyntaxError, parse_key

SYSTEM_COLUMNS = ("modifiedon", "createdon", "versionnumber")

# Dataverse error codes (hex SDK codes). The expired-token code is ExpiredVersionStamp, which
# change retrieval raises with "Version stamp associated with the client has expired";
# codes marked [unverified] are plausible stand-ins the docs do not confirm.
EXPIRED_VERSION_STAMP = "0x80044352"
NOT_FOUND = "0x80040217"
DUPLICATE_RECORD = "0x80040237"
VERSION_MISMATCH = "0x80060882"  # [unverified]
BAD_REQUEST = "0x80060888"
INVALID_PROPERTY = "0x80060891"
VALIDATION = "0x80044331"
INVALID_ARGUMENT = "0x80040203"  # [unverified] for inactive keys / untracked tables
REQUEST_LIMIT = "0x80072322"


class DataverseFault(Exception):
    """An error the emulator answers: HTTP status, Dataverse error code and message."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON error body Dataverse sends."""
        return {"error": {"code": self.code, "message": self.message}}


@dataclass(frozen=True, slots=True)
class TableSpec:
    """The schema of one emulated table: names, writable columns, alternate keys."""

    entity_set: str
    logical_name: str
    primary_key: str
    columns: frozenset[str]
    alternate_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    change_tracking: bool = True
    max_lengths: Mapping[str, int] = field(default_factory=dict)

    @property
    def readable(self) -> frozenset[str]:
        """Every column a query may name: writable ones, the primary key, system columns."""
        return self.columns | {self.primary_key, *SYSTEM_COLUMNS}


def default_tables() -> list[TableSpec]:
    """The quote-to-cash tables the emulator serves unless told otherwise."""
    account = {"name", "accountnumber", "erp_customerid", "telephone1", "revenue", "address1_city"}
    contact = {"firstname", "lastname", "emailaddress1", "erp_contactid", "_parentcustomerid_value"}
    opportunity = {"name", "estimatedvalue", "actualvalue", "closeprobability", "estimatedclosedate"}
    state = {"statecode", "statuscode"}
    return [
        TableSpec(
            "accounts",
            "account",
            "accountid",
            frozenset(account | state | {"_parentaccountid_value"}),
            {"erp_customerid_key": ("erp_customerid",), "accountnumber_key": ("accountnumber",)},
            max_lengths={"name": 160},
        ),
        TableSpec(
            "contacts", "contact", "contactid", frozenset(contact), {"erp_contactid_key": ("erp_contactid",)}
        ),
        TableSpec(
            "opportunities",
            "opportunity",
            "opportunityid",
            frozenset(opportunity | state | {"erp_projectid", "_parentaccountid_value", "_customerid_value"}),
            {"erp_projectid_key": ("erp_projectid",)},
            max_lengths={"name": 300},
        ),
    ]


def same_value(a: Any, b: Any) -> bool:
    """Compare two column values the way Dataverse's SQL collation does (text ignores case)."""
    if isinstance(a, str) and isinstance(b, str):
        return a.casefold() == b.casefold()
    return bool(a == b)


def _invalid_property(spec: TableSpec, name: str) -> DataverseFault:
    return DataverseFault(
        400,
        INVALID_PROPERTY,
        f"Invalid property '{name}' was found in entity 'Microsoft.Dynamics.CRM.{spec.logical_name}'.",
    )


class EmulatedStore:
    """Rows per entity set, one database-wide version counter, and tombstones for change tracking."""

    def __init__(self, specs: Sequence[TableSpec], clock: Callable[[], datetime]) -> None:
        self.specs = {spec.entity_set: spec for spec in specs}
        self.rows: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in self.specs}
        self.tombstones: dict[str, dict[str, int]] = {s: {} for s in self.specs}
        self.key_status: dict[tuple[str, str], str] = {}
        self.version = 1000
        self._clock = clock

    def spec(self, entity_set: str) -> TableSpec:
        """Return a table's schema, or fail the way Dataverse does for an unknown segment."""
        spec = self.specs.get(entity_set)
        if spec is None:
            raise DataverseFault(404, BAD_REQUEST, f"Resource not found for the segment '{entity_set}'.")
        return spec

    def by_logical_name(self, name: str) -> TableSpec:
        """Return a table's schema by logical name (``account``)."""
        spec = next((s for s in self.specs.values() if s.logical_name == name), None)
        if spec is None:
            raise DataverseFault(
                404, NOT_FOUND, f"Could not find an entity with specified entity name: {name}"
            )
        return spec

    def set_change_tracking(self, entity_set: str, enabled: bool) -> None:
        """Turn a table's change tracking on or off."""
        self.specs[entity_set] = replace(self.spec(entity_set), change_tracking=enabled)

    def values(self, spec: TableSpec, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a request body into column values (lookups bound with ``@odata.bind``)."""
        out: dict[str, Any] = {}
        for name, value in body.items():
            if name.startswith("@odata."):
                continue
            if name.endswith("@odata.bind"):
                nav = name.split("@", 1)[0]
                candidates = (f"_{nav}_value", f"_{nav.rsplit('_', 1)[0]}_value")  # customerid_account
                column = next((c for c in candidates if c in spec.columns), None)
                target = str(value)
                if column is None or "(" not in target:
                    raise _invalid_property(spec, nav)
                out[column] = target[target.index("(") + 1 : target.rindex(")")].lower()
                continue
            if name in SYSTEM_COLUMNS or name == spec.primary_key:
                continue  # read-only, or the address itself: ignored in a body
            if name not in spec.columns:
                raise _invalid_property(spec, name)
            limit = spec.max_lengths.get(name)
            if limit is not None and isinstance(value, str) and len(value) > limit:
                raise DataverseFault(
                    400,
                    VALIDATION,
                    f"A validation error occurred. The length of the '{name}' attribute of the "
                    f"'{spec.logical_name}' entity exceeded the maximum allowed length of '{limit}'.",
                )
            out[name] = value
        return out

    def _check_unique(self, spec: TableSpec, values: Mapping[str, Any], own_id: str | None) -> None:
        for columns in spec.alternate_keys.values():
            if not all(values.get(c) is not None for c in columns):
                continue
            for rid, row in self.rows[spec.entity_set].items():
                if rid != own_id and all(same_value(row.get(c), values[c]) for c in columns):
                    raise DataverseFault(
                        412, DUPLICATE_RECORD, "A record with matching key values already exists."
                    )

    def _next_version(self) -> int:
        self.version += 1
        return self.version

    def _stamp(self, modifiedon: datetime | None) -> datetime:
        return (modifiedon or self._clock()).replace(microsecond=0)

    def create(
        self, spec: TableSpec, values: Mapping[str, Any], rid: str | None, modifiedon: datetime | None = None
    ) -> str:
        """Insert a row (a fresh GUID unless ``rid`` is given) and return its id."""
        rid = (rid or str(uuid.uuid4())).lower()
        if rid in self.rows[spec.entity_set]:
            raise DataverseFault(412, DUPLICATE_RECORD, "A record with matching key values already exists.")
        self._check_unique(spec, values, None)
        stamp = self._stamp(modifiedon)
        row: dict[str, Any] = dict.fromkeys(spec.columns)
        row.update(values)
        row[spec.primary_key] = rid
        row.update(createdon=stamp, modifiedon=stamp, versionnumber=self._next_version())
        self.rows[spec.entity_set][rid] = row
        self.tombstones[spec.entity_set].pop(rid, None)  # re-created: the old removal is moot
        return rid

    def touch(
        self,
        spec: TableSpec,
        row: dict[str, Any],
        values: Mapping[str, Any],
        modifiedon: datetime | None = None,
    ) -> None:
        """Update a row's columns, bumping ``modifiedon`` and ``versionnumber``."""
        self._check_unique(spec, {**row, **values}, row[spec.primary_key])
        row.update(values)
        row["modifiedon"] = self._stamp(modifiedon)
        row["versionnumber"] = self._next_version()

    def remove(self, spec: TableSpec, rid: str) -> None:
        """Delete a row and leave a tombstone for change tracking."""
        if self.rows[spec.entity_set].pop(rid, None) is None:
            raise DataverseFault(404, NOT_FOUND, f"{spec.logical_name} With Id = {rid} Does Not Exist")
        self.tombstones[spec.entity_set][rid] = self._next_version()

    def find(self, spec: TableSpec, raw_key: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Resolve the text inside ``set(...)`` to (row or None, the key's column values)."""
        try:
            key = parse_key(unquote(raw_key))
        except ODataSyntaxError as exc:
            raise DataverseFault(400, BAD_REQUEST, f"Bad Request - Error in query syntax: {exc}") from exc
        rows = self.rows[spec.entity_set]
        if isinstance(key, str):
            return rows.get(key), {spec.primary_key: key}
        if set(key) == {spec.primary_key}:
            rid = str(key[spec.primary_key]).lower()
            return rows.get(rid), {spec.primary_key: rid}
        for name, columns in spec.alternate_keys.items():
            if set(columns) == set(key):
                if self.key_status.get((spec.entity_set, name), "Active") != "Active":
                    raise DataverseFault(400, INVALID_ARGUMENT, f"The alternate key '{name}' is not active.")
                match = next(
                    (r for r in rows.values() if all(same_value(r.get(c), key[c]) for c in columns)), None
                )
                return match, key
        raise DataverseFault(
            400,
            INVALID_ARGUMENT,
            f"The key attribute(s) {', '.join(sorted(key))} of '{spec.logical_name}' are not defined "
            "as an alternate key.",
        )

    def changes(self, spec: TableSpec, since: int, upto: int) -> list[tuple[int, int, str]]:
        """Rows changed and rows removed in ``(since, upto]``: ``(0 upsert | 1 delete, version, id)``.

        Upserts come first, then removals, each in version order, as Dataverse returns them.
        """
        out = [
            (0, row["versionnumber"], rid)
            for rid, row in self.rows[spec.entity_set].items()
            if since < row["versionnumber"] <= upto
        ]
        out += [(1, v, rid) for rid, v in self.tombstones[spec.entity_set].items() if since < v <= upto]
        out.sort()
        return out


# --- ordering and paging cookies -------------------------------------------------------------
def encode_state(state: Mapping[str, Any]) -> str:
    """Encode a paging cookie (opaque to clients: base64 of JSON)."""
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode()


def decode_state(token: str) -> dict[str, Any]:
    """Decode a paging cookie made by ``encode_state``."""
    try:
        state = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError) as exc:
        raise DataverseFault(400, BAD_REQUEST, "The $skiptoken value is not valid.") from exc
    if not isinstance(state, dict):
        raise DataverseFault(400, BAD_REQUEST, "The $skiptoken value is not valid.")
    return state


def pack(value: Any) -> list[Any]:
    """Make a column value JSON-safe for a paging cookie."""
    if isinstance(value, datetime):
        return ["dt", value.isoformat()]
    if value is None or isinstance(value, bool | int | str):
        return ["raw", value]
    return ["dec", str(value)]


def unpack(item: Sequence[Any]) -> Any:
    """Undo ``pack``."""
    tag, value = item[0], item[1]
    if tag == "dt":
        return datetime.fromisoformat(value)
    return Decimal(value) if tag == "dec" else value


def _cmp(a: Any, b: Any) -> int:
    if a is None or b is None:
        return (a is not None) - (b is not None)
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.casefold(), b.casefold()
    try:
        return int(a > b) - int(a < b)
    except TypeError:
        return int(str(a) > str(b)) - int(str(a) < str(b))


def compare_rows(a: Sequence[Any], b: Sequence[Any], descending: Sequence[bool]) -> int:
    """Compare two sort tuples column by column (-1, 0, 1), honouring each direction."""
    for x, y, desc in zip(a, b, descending, strict=True):
        c = _cmp(x, y)
        if c:
            return -c if desc else c
    return 0


class SortKey:
    """Orders rows by several columns with per-column direction (nulls first when ascending)."""

    __slots__ = ("values", "descending")

    def __init__(self, values: list[Any], descending: list[bool]) -> None:
        self.values = values
        self.descending = descending

    def __lt__(self, other: SortKey) -> bool:
        return compare_rows(self.values, other.values, self.descending) < 0

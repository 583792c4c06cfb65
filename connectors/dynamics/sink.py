"""Writing to Dataverse: one upsert or delete request per op, each answered by an ``Outcome``.

- Known record (the op's key holds the primary key): ``PATCH /set(<guid>)`` with
  ``If-Match: *`` (or the op's ``@odata.etag``), so a record deleted meanwhile is reported
  (``record_deleted``) instead of silently re-created; 412 is a ``conflict``.
- Otherwise, upsert by the table's alternate key: ``PATCH /set(key='value')`` without
  ``If-Match``, so replaying the op updates what the first run created.
- Delete by id (or alternate key); 404 means already gone, which is applied.

Record failures (400, 404, 409, 412, 413, 422) are ``reject`` outcomes naming Dataverse's
error code and, when its message names one, the field. 429, 5xx and network errors raise for
the whole batch (``RateLimited``/``RetryableError``); 401 after the auth's one refresh and 403
raise ``AuthError``. Every write sends ``Prefer: return=representation`` with a ``$select``
of the key and ``versionnumber``, so the outcome carries the row's new version.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from agent.model import Op, Outcome
from connectors.dynamics.odata import key_segment
from connectors.dynamics.session import DvSession, DvTable

logger = logging.getLogger(__name__)

_RECORD_STATUSES = frozenset({400, 404, 409, 412, 413, 422})
_ETAG = re.compile(r'W/"(\d+)"')
_QUOTED = re.compile(r"'([A-Za-z_][\w.@]*)'")
_DETAIL_LIMIT = 500


class DvWriter:
    """Applies ops to Dataverse tables, one HTTP request per op."""

    def __init__(self, session: DvSession, tables: Mapping[str, DvTable]) -> None:
        self.session = session
        self.tables = tables

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in order; batch-wide failures raise, record failures become outcomes."""
        outcomes = [self._apply_one(op) for op in ops]
        logger.info(
            "event=dataverse_applied n=%s rejected=%s",
            len(outcomes),
            sum(o.status == "reject" for o in outcomes),
        )
        return outcomes

    def table_for(self, object_name: str) -> DvTable | None:
        """Find the table an op names: by stream name, logical name or entity set."""
        if object_name in self.tables:
            return self.tables[object_name]
        return next((t for t in self.tables.values() if object_name in (t.logical_name, t.entity_set)), None)

    def _apply_one(self, op: Op) -> Outcome:
        table = self.table_for(op.object_name)
        if table is None:
            return Outcome.reject("unknown_table", f"no Dataverse table is configured for {op.object_name!r}")
        address = self._address(table, op)
        if isinstance(address, Outcome):
            return address
        path, known = address
        if op.action == "delete":
            return self._delete(table, op, path)
        fields = dict(op.fields)
        etag = fields.pop("@odata.etag", None)
        fields.pop(table.primary_key, None)
        headers = {"Prefer": "return=representation"}
        if known:
            headers["If-Match"] = str(etag) if etag else "*"  # update only: never re-create a deleted row
        else:
            fields.update({c: op.key[c] for c in table.alternate_key or ()})
            if etag:
                headers["If-Match"] = str(etag)
        params = {"$select": f"{table.primary_key},versionnumber"}
        response = self.session.send("PATCH", path, params=params, headers=headers, body=fields)
        status = response.status_code
        if status in (200, 201, 204):
            return self._applied(table, response)
        if status == 404 and known:
            return Outcome.reject(
                "record_deleted", "the record no longer exists in Dataverse; not re-created"
            )
        if status == 412:
            return Outcome.reject("conflict", _message(response) or "the record changed since it was read")
        if status in _RECORD_STATUSES:
            return _rejected(response, fields)
        self.session.raise_for(response)
        return Outcome.retry(None, f"unexpected status {status}")

    def _address(self, table: DvTable, op: Op) -> tuple[str, bool] | Outcome:
        base = self.session.path(table.entity_set)
        rid = op.key.get(table.primary_key)
        if rid:
            try:
                guid = str(uuid.UUID(str(rid)))
            except ValueError:
                return Outcome.reject("bad_key", f"{table.primary_key} is not a GUID", table.primary_key)
            return f"{base}({guid})", True
        columns = table.alternate_key or ()
        missing = [c for c in columns if op.key.get(c) in (None, "")]
        if not columns or missing:
            field = missing[0] if missing else table.primary_key
            return Outcome.reject(
                "no_key", f"the op carries neither {table.primary_key} nor the alternate key", field
            )
        return f"{base}({key_segment({c: op.key[c] for c in columns})})", False

    def _delete(self, table: DvTable, op: Op, path: str) -> Outcome:
        response = self.session.send("DELETE", path)
        external = str(op.key.get(table.primary_key) or "")
        if response.status_code in (200, 204):
            return Outcome.applied(external or _entity_id(response) or op.canonical_id)
        if response.status_code == 404:  # already gone: the delete's goal is met
            return Outcome.applied(external or op.canonical_id)
        if response.status_code in _RECORD_STATUSES:
            return _rejected(response, {})
        self.session.raise_for(response)
        return Outcome.retry(None, f"unexpected status {response.status_code}")

    def _applied(self, table: DvTable, response: httpx.Response) -> Outcome:
        body: Any = None
        if response.content:
            try:
                body = response.json()
            except ValueError:
                body = None
        rid = body.get(table.primary_key) if isinstance(body, dict) else None
        rid = rid or _entity_id(response)
        version = body.get("versionnumber") if isinstance(body, dict) else None
        if version is None:
            match = _ETAG.search(response.headers.get("ETag", ""))
            version = match.group(1) if match else None
        if not rid:
            return Outcome.retry(None, "Dataverse answered without the record id")
        return Outcome.applied(str(rid), str(version) if version is not None else None)


def _entity_id(response: httpx.Response) -> str | None:
    header = response.headers.get("OData-EntityId", "")
    if "(" not in header:
        return None
    return header[header.rindex("(") + 1 : header.rindex(")")] or None


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("message") or "")[:_DETAIL_LIMIT] if isinstance(error, dict) else ""


def _rejected(response: httpx.Response, fields: Mapping[str, Any]) -> Outcome:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    message = _message(response) or f"Dataverse answered {response.status_code}"
    names = {name.split("@", 1)[0] for name in fields}
    field = next((m for m in _QUOTED.findall(message) if m in names), None)
    return Outcome.reject(code or f"http_{response.status_code}", message, field)

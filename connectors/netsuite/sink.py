"""Writes to NetSuite through the REST record service, one record per request.

An op whose key holds the internal id (``{"id": "4711"}``) is a ``PATCH`` of that record; one
keyed by the external id is an upsert, ``PUT /record/v1/{type}/eid:{value}``, which answers
204 with the record's URL in ``Location`` whether it created or updated, so a replay creates
nothing twice. Deletes go by id or eid, and a 404 means already gone. A ``unit`` op (several
upserts, later ones naming earlier ids) runs as a forward-recovering saga
(``connectors.netsuite.units``) and answers like the PostgreSQL sink: ``applied`` with the
steps' ids as a JSON list, ``retry``, or ``reject`` naming the step and what already exists.

Per-op verdicts: a 4xx with ``o:errorDetails`` rejects that op (code, detail, and the field
from ``o:errorPath`` translated back to its SuiteQL column). The concurrency limit (429, or
400/403 with ``SSS_REQUEST_LIMIT_EXCEEDED``/``CONCURRENCY_LIMIT_EXCEEDED``), 5xx and network
errors stop the batch: that op and every later one come back as ``retry`` (the throttle with
the backoff hint), the ones already written keep their ``applied`` outcome. A 401 that
survives the token refresh raises ``AuthError``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from agent.errors import AuthError, RateLimited, RetryableError
from agent.model import Op, Outcome
from connectors.http import classify_http, json_body, redact_url
from connectors.netsuite.errors import error_details, is_throttled, throttle_wait
from connectors.netsuite.units import EID, UnitRunner, plan

if TYPE_CHECKING:
    from connectors.netsuite.client import NsRecord

logger = logging.getLogger(__name__)

RECORD_PATH = "/services/rest/record/v1"
_SYSTEM_COLUMNS = frozenset({"id", "lastmodifieddate", "datecreated"})
_HEADERS = {"Content-Type": "application/json", "X-NetSuite-PropertyNameValidation": "error"}


class RecordWriter:
    """Applies upsert/delete ops to NetSuite records, answering one ``Outcome`` per op."""

    def __init__(
        self,
        target: str,
        client: httpx.Client,
        auth: httpx.Auth,
        records: Mapping[str, NsRecord],
        *,
        throttle_backoff: float,
    ) -> None:
        self._target = target
        self._client = client
        self._auth = auth
        self._records = dict(records)
        self._by_type = {r.record_type: r for r in records.values()}
        self._hint = throttle_backoff
        self._units = UnitRunner()

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` in order; stop at the first throttle or server failure (rest: retry)."""
        outcomes: list[Outcome] = []
        for index, op in enumerate(ops):
            try:
                outcomes.append(self._apply(op))
            except RateLimited as exc:
                logger.warning(
                    "event=netsuite_throttled target=%s trace_id=%s remaining=%s",
                    self._target,
                    op.trace_id,
                    len(ops) - index,
                )
                outcomes += [Outcome.retry(exc.retry_after, "NetSuite concurrency limit")] * (
                    len(ops) - index
                )
                break
            except RetryableError as exc:
                logger.warning(
                    "event=netsuite_write_failed target=%s trace_id=%s error=%s",
                    self._target,
                    op.trace_id,
                    type(exc).__name__,
                )
                outcomes += [Outcome.retry(None, str(exc))] * (len(ops) - index)
                break
        return outcomes

    def _record_for(self, name: str) -> NsRecord | None:
        return self._records.get(name) or self._by_type.get(name)

    def _apply(self, op: Op) -> Outcome:
        if op.action == "unit":
            steps = plan(op, self._record_for)
            return steps if isinstance(steps, Outcome) else self._units.run(op, steps, self._apply)
        record = self._record_for(op.object_name)
        if record is None:
            return Outcome.reject("UNKNOWN_RECORD", f"no NetSuite record configured for {op.object_name!r}")
        internal = op.key.get("id")
        external = op.key.get(record.external_id_field)
        base = f"{RECORD_PATH}/{record.record_type}"
        if internal is not None:
            if not str(internal).isdigit():
                return Outcome.reject("INVALID_KEY", "the internal id is not numeric", "id")
            path = f"{base}/{internal}"
        elif external is not None:
            if not EID.match(str(external)):
                return Outcome.reject(
                    "INVALID_KEY",
                    "an external id may hold only letters, digits, _ and -",
                    record.external_id_field,
                )
            path = f"{base}/eid:{external}"
        else:
            return Outcome.reject("MISSING_KEY", f"the op has neither id nor {record.external_id_field}")
        if op.action == "delete":
            response = self._send("DELETE", path, None)
            if response.is_success or response.status_code == 404:
                return Outcome.applied(str(internal if internal is not None else external))
            return self._failure(response, record)
        body = self._body(record, op.fields, by_eid=internal is None)
        response = self._send("PUT" if internal is None else "PATCH", path, body)
        if not response.is_success:
            return self._failure(response, record)
        if internal is not None:
            return Outcome.applied(str(internal))
        located = response.headers.get("Location", "").rstrip("/").rsplit("/", 1)[-1]
        return Outcome.applied(located if located.isdigit() else self._lookup(path, record))

    def _lookup(self, path: str, record: NsRecord) -> str:
        response = self._send("GET", path, None)
        if not response.is_success:
            self._failure(response, record)
            raise RetryableError(f"GET {path} answered {response.status_code} after an upsert")
        body = json_body(response)
        return str(body.get("id")) if isinstance(body, dict) else ""

    def _body(self, record: NsRecord, fields: Mapping[str, Any], *, by_eid: bool) -> dict[str, Any]:
        body: dict[str, Any] = {}
        for column, value in fields.items():
            if column in _SYSTEM_COLUMNS or (by_eid and column == record.external_id_field):
                continue
            default = "externalId" if column == record.external_id_field else column
            name = record.rest_names.get(column, default)
            if column in record.refs and value is not None and not isinstance(value, Mapping):
                value = {"id": str(value)}
            body[name] = value
        return body

    def _send(self, method: str, path: str, body: Mapping[str, Any] | None) -> httpx.Response:
        content = None if body is None else json.dumps(body, default=_wire).encode()
        with classify_http():
            response = self._client.request(method, path, content=content, headers=_HEADERS, auth=self._auth)
            response.read()
        return response

    def _failure(self, response: httpx.Response, record: NsRecord) -> Outcome:
        where = (
            f"{response.request.method} {redact_url(response.request.url)} answered {response.status_code}"
        )
        if is_throttled(response):
            raise RateLimited(where, retry_after=throttle_wait(response, self._hint))
        if response.status_code == 401:
            raise AuthError(f"{where} INVALID_LOGIN after a token refresh")
        details = error_details(response)
        if response.status_code >= 500:
            code = details[0].code if details else ""
            raise RetryableError(f"{where} {code}".rstrip())
        if not details:
            return Outcome.reject(f"HTTP_{response.status_code}", where)
        first = details[0]
        return Outcome.reject(first.code, first.detail, _column(record, first.path))


def _column(record: NsRecord, path: str | None) -> str | None:
    if not path:
        return None
    head = re.split(r"[.\[]", path, maxsplit=1)[0]
    for column, rest in record.rest_names.items():
        if rest == head:
            return column
    return record.external_id_field if head == "externalId" else head


def _wire(value: object) -> object:
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)  # never round money
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot send a {type(value).__name__} to NetSuite")

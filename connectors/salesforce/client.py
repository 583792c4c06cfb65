"""The Salesforce connector: SOQL change polling (Source) and sObject Collections writes (Sink).

Reads poll ``queryAll`` by ``(SystemModstamp, Id)`` with a look-back and a signpost (see
``connectors.salesforce.source``); writes upsert by external id, update by ``Id`` and delete
through sObject Collections (see ``connectors.salesforce.sink``). Every API call passes one
gate that enforces the configured ``ApiBudget`` before sending, classifies failures and
keeps the server's ``Sforce-Limit-Info`` usage.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from agent.errors import (
    BudgetExhausted,
    PermanentError,
    RateLimited,
    RetryableError,
    SyncAgentError,
)
from agent.model import Batch, Change, Cursor, Op, Outcome, Problem, Rejected, utcnow
from connectors.http import (
    HttpStatusFailure,
    classify_http,
    dump_json,
    json_body,
    raise_for_status,
)
from connectors.paging import follow_next_link
from connectors.salesforce.sink import WriteRequest, WriteTarget, outcome_of, plan_writes, target_of
from connectors.salesforce.source import (
    ReadPosition,
    SfObject,
    build_query,
    record_to_change,
    soql_quote,
)

logger = logging.getLogger(__name__)

_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")
_VERSION = re.compile(r"v\d+\.\d+\Z")
_DAY = timedelta(days=1)
_LOOKUP_CHUNK = 100
_FETCH_CHUNK = 200  # Ids per SOQL query: keeps the GET URL far below Salesforce's 16k limit


@dataclass(frozen=True, slots=True)
class ApiBudget:
    """How many API calls this connector may make: per rolling day and per run (None: no cap)."""

    per_day: int | None = None
    per_run: int | None = None


class _ApiMeter:
    """Counts calls against an ``ApiBudget``; refuses a call before it is made once spent."""

    def __init__(self, budget: ApiBudget | None, clock: Callable[[], datetime]) -> None:
        self._budget = budget or ApiBudget()
        self._clock = clock
        self._lock = threading.Lock()
        self._day: deque[datetime] = deque()
        self.calls = 0

    def spend(self, what: str) -> None:
        """Count one call, or raise ``BudgetExhausted`` without counting it."""
        with self._lock:
            now = self._clock()
            while self._day and self._day[0] <= now - _DAY:
                self._day.popleft()
            per_run, per_day = self._budget.per_run, self._budget.per_day
            if per_run is not None and self.calls >= per_run:
                raise BudgetExhausted(f"{what}: API budget per run ({per_run} calls) is used up")
            if per_day is not None and len(self._day) >= per_day:
                wait = (self._day[0] + _DAY - now).total_seconds() if self._day else _DAY.total_seconds()
                raise BudgetExhausted(
                    f"{what}: API budget per day ({per_day} calls) is used up", retry_after=max(wait, 0.0)
                )
            self.calls += 1
            self._day.append(now)

    def remaining(self) -> dict[str, int | None]:
        """Calls left per day and per run (None where uncapped)."""
        with self._lock:
            now = self._clock()
            today = sum(1 for t in self._day if t > now - _DAY)
            per_day, per_run = self._budget.per_day, self._budget.per_run
            return {
                "calls_last_24h": today,
                "budget_day_remaining": None if per_day is None else max(per_day - today, 0),
                "budget_run_remaining": None if per_run is None else max(per_run - self.calls, 0),
            }


def _salesforce_rule(failure: HttpStatusFailure) -> SyncAgentError | None:
    code = failure.error_code
    if code == "REQUEST_LIMIT_EXCEEDED":  # Salesforce throttles with 403, never Retry-After
        return RateLimited(str(failure), retry_after=None)
    if code in ("UNABLE_TO_LOCK_ROW", "QUERY_TIMEOUT", "INVALID_QUERY_LOCATOR", "SERVER_UNAVAILABLE"):
        return RetryableError(str(failure))
    return None


class SalesforceConnector:
    """Salesforce as a Source (SOQL polling by SystemModstamp+Id) and a Sink (Collections writes)."""

    def __init__(
        self,
        name: str,
        client: httpx.Client,
        *,
        auth: httpx.Auth,
        api_version: str = "v62.0",
        objects: Mapping[str, SfObject],
        lookback: timedelta = timedelta(minutes=5),
        page_size: int = 2000,
        budget: ApiBudget | None = None,
        clock: Callable[[], datetime] = utcnow,
        safety_lag: timedelta = timedelta(seconds=2),
        start_at: datetime | None = None,
    ) -> None:
        if not _VERSION.match(api_version):
            raise ValueError(f"api_version must look like 'v62.0', got {api_version!r}")
        self.name = name
        self._client = client
        self._auth = auth
        self._version = api_version
        self._base = f"/services/data/{api_version}"
        self._objects = dict(objects)
        self._lookback = lookback
        self._page_size = page_size
        self._clock = clock
        self._safety_lag = safety_lag
        self._start_at = start_at
        self._meter = _ApiMeter(budget, clock)
        self._server_usage: tuple[int, int] | None = None

    # --- Source ---------------------------------------------------------------------
    def streams(self) -> Sequence[str]:
        """The configured object names, one stream each."""
        return list(self._objects)

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return up to ``limit`` changes after ``cursor``, never past the walk's signpost."""
        obj = self._object(stream)
        if limit < 1:
            raise ValueError("limit must be at least 1")
        try:
            pos = ReadPosition.from_cursor(cursor, start_at=self._start_at)
        except ValueError as exc:
            raise PermanentError(f"{self.name}/{stream}: unreadable cursor: {exc}") from exc
        if pos.upto is not None and pos.ts is not None:
            soql = build_query(obj, after=(pos.ts, pos.id), since=None, upto=pos.upto)
        else:
            # the look-back re-reads behind a caught-up cursor; a configured start is exact
            since = pos.ts - self._lookback if cursor is not None and pos.ts is not None else pos.ts
            soql = build_query(obj, after=None, since=since, upto=None)
        resource = "queryAll" if obj.use_query_all else "query"
        first = self._call(
            "GET", f"{self._base}/{resource}", params={"q": soql}, headers=self._query_headers()
        )
        signpost = pos.upto or self._signpost(first)
        changes: list[Change] = []
        rejected: list[Rejected] = []
        last: tuple[datetime, str] | None = None
        more = False
        for page in follow_next_link(self._client, json_body(first), get=self._get_page):
            records = page.get("records") or []
            for record in records:
                try:
                    change, stamp = record_to_change(self.name, stream, obj, record)
                except (KeyError, ValueError, TypeError) as exc:
                    rejected.append(_rejected(stream, record, exc))
                    continue
                if stamp > signpost:
                    break
                if len(changes) >= limit:
                    more = True
                    break
                changes.append(change)
                last = (stamp, str(record["Id"]))
            else:
                if len(changes) >= limit and page.get("nextRecordsUrl"):
                    more = True
                    break
                continue
            break  # the inner loop stopped early: signpost or limit
        if more and last is not None:
            next_pos = ReadPosition(ts=last[0], id=last[1], upto=signpost)
        else:
            next_pos = ReadPosition(ts=signpost, id="")
        logger.info(
            "event=salesforce_read source=%s stream=%s n=%s more=%s signpost=%s",
            self.name,
            stream,
            len(changes),
            more,
            signpost.isoformat(),
        )
        return Batch(changes=changes, next_cursor=next_pos.to_cursor(), more=more, rejected=tuple(rejected))

    def cursor_for_time(self, stream: str, when: datetime) -> Cursor:
        """A cursor that re-reads ``stream`` from ``when`` (an operator's rewind)."""
        return ReadPosition(ts=when.astimezone(UTC), id="").to_cursor()

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Do nothing: Salesforce keeps no reader state to acknowledge."""

    # --- Sink -----------------------------------------------------------------------
    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` through sObject Collections; one outcome per op, in order."""
        outcomes: dict[int, Outcome] = {}
        targets: dict[int, WriteTarget] = {}
        for index, op in enumerate(ops):
            target = target_of(op)
            if isinstance(target, Outcome):
                outcomes[index] = target
            else:
                targets[index] = target
        delete_ids = self._resolve_delete_ids(targets, outcomes)
        for request in plan_writes(ops, targets, delete_ids):
            results = self._send_write(request)
            if len(results) != len(request.indexes):
                raise PermanentError(
                    f"{self.name}: {request.kind} of {len(request.indexes)} {request.object_name} "
                    f"records answered {len(results)} results"
                )
            for index, result in zip(request.indexes, results, strict=True):
                outcomes[index] = outcome_of(request.kind, result if isinstance(result, Mapping) else {})
        return [outcomes[i] for i in range(len(ops))]

    def _send_write(self, request: WriteRequest) -> list[Any]:
        if request.kind == "delete":
            params = {"ids": ",".join(request.ids), "allOrNone": "false"}
            response = self._call("DELETE", f"{self._base}/composite/sobjects", params=params)
        else:
            path = f"{self._base}/composite/sobjects"
            if request.kind == "upsert":
                path += f"/{request.object_name}/{request.key_field}"
            body = {"allOrNone": False, "records": list(request.records)}
            response = self._call(
                "PATCH", path, content=dump_json(body), headers={"Content-Type": "application/json"}
            )
        results = json_body(response)
        if not isinstance(results, list):
            raise PermanentError(f"{self.name}: Collections {request.kind} answered a non-list body")
        return results

    def _resolve_delete_ids(
        self, targets: Mapping[int, WriteTarget], outcomes: dict[int, Outcome]
    ) -> dict[int, str]:
        ids: dict[int, str] = {}
        wanted: dict[tuple[str, str], list[int]] = {}
        for index, target in targets.items():
            if target.kind != "delete":
                continue
            if target.key_field == "Id":
                ids[index] = target.key_value
            else:
                wanted.setdefault((target.object_name, target.key_field), []).append(index)
        for (object_name, field), indexes in wanted.items():
            values = sorted({targets[i].key_value for i in indexes})
            found: dict[str, list[str]] = {}
            for start in range(0, len(values), _LOOKUP_CHUNK):
                chunk = values[start : start + _LOOKUP_CHUNK]
                soql = (
                    f"SELECT Id, {field} FROM {object_name} "
                    f"WHERE {field} IN ({', '.join(soql_quote(v) for v in chunk)})"
                )
                for record in self._query_records(soql):
                    found.setdefault(str(record.get(field)), []).append(str(record["Id"]))
            for index in indexes:
                matches = found.get(targets[index].key_value, [])
                if len(matches) == 1:
                    ids[index] = matches[0]
                elif not matches:
                    outcomes[index] = Outcome("applied", external_id=None, detail="already deleted")
                else:
                    outcomes[index] = Outcome.reject(
                        "MULTIPLE_MATCHES", f"{len(matches)} {object_name} records share the key", field
                    )
        return ids

    # --- Lookup (reconciliation) -------------------------------------------------------
    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return the current records of ``object_name`` by Id; ``None`` where deleted or never there.

        One ``SELECT ... WHERE Id IN (...)`` query per 200 Ids (``query``, not ``queryAll``:
        a record in the Recycle Bin counts as gone). A 15-character Id finds its 18-character form.
        """
        return self._fetch(object_name, ids, "Id")

    def fetch_by(
        self, object_name: str, field: str, values: Sequence[str]
    ) -> dict[str, dict[str, Any] | None]:
        """Return ``{value: record}`` of the records whose ``field`` (an external id) holds each value."""
        obj = self._object(object_name)
        if field not in obj.select_list():
            raise PermanentError(f"{object_name}.{field} is not a mapped field. Fix: map it")
        return self._fetch(object_name, values, field)

    def _fetch(self, object_name: str, values: Sequence[str], field: str) -> dict[str, dict[str, Any] | None]:
        obj = self._object(object_name)
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(values)
        short = {i[:15]: i for i in out if len(i) == 15} if field == "Id" else {}
        wanted = list(out)
        for start in range(0, len(wanted), _FETCH_CHUNK):
            chunk = wanted[start : start + _FETCH_CHUNK]
            soql = (
                f"SELECT {', '.join(obj.select_list())} FROM {obj.name} "
                f"WHERE {field} IN ({', '.join(soql_quote(i) for i in chunk)})"
            )
            for record in self._query_records(soql):
                rid = str(record.get(field))
                key = rid if rid in out else short.get(rid[:15])
                if key is not None:
                    out[key] = {k: v for k, v in record.items() if k != "attributes"}
        return out

    # --- checks and status ------------------------------------------------------------
    def check(self) -> list[Problem]:
        """Check the token, the API version and every object's fields and external id."""
        subject = f"salesforce:{self.name}"
        try:
            versions = json_body(self._call("GET", "/services/data/"))
        except SyncAgentError as exc:
            return [
                Problem(
                    subject,
                    f"cannot reach the API or get a token: {exc}",
                    fix="check the instance URL, client id/secret and the Run As user",
                )
            ]
        problems: list[Problem] = []
        listed = {str(v.get("version")) for v in versions or [] if isinstance(v, Mapping)}
        if self._version[1:] not in listed:
            problems.append(
                Problem(
                    subject,
                    f"API version {self._version} is not offered",
                    fix=f"use one of {', '.join(sorted(listed))}",
                )
            )
            return problems
        for obj in self._objects.values():
            problems.extend(self._check_object(subject, obj))
        return problems

    def _check_object(self, subject: str, obj: SfObject) -> list[Problem]:
        where = f"{subject}/{obj.name}"
        try:
            describe = json_body(self._call("GET", f"{self._base}/sobjects/{obj.name}/describe"))
        except SyncAgentError as exc:
            return [
                Problem(
                    where,
                    f"cannot describe the object: {exc}",
                    fix="check the object name and the integration user's access",
                )
            ]
        fields = {str(f.get("name")).lower(): f for f in describe.get("fields", []) if isinstance(f, Mapping)}
        problems = [
            Problem(
                where,
                f"field {name} does not exist or is not visible",
                fix="fix the field list or grant field-level security",
            )
            for name in obj.select_list()
            if "." not in name and name.lower() not in fields
        ]
        if obj.external_id_field:
            ext = fields.get(obj.external_id_field.lower())
            if ext is None:
                problems.append(
                    Problem(
                        where,
                        f"external id field {obj.external_id_field} is missing",
                        fix="create it as a custom field flagged External ID (Unique)",
                    )
                )
            elif ext.get("externalId") is not True:
                problems.append(
                    Problem(
                        where,
                        f"field {obj.external_id_field} is not an External ID",
                        fix="flag the field External ID and Unique in Setup",
                    )
                )
        return problems

    def api_usage(self) -> dict[str, Any]:
        """Calls made, the server's reported usage (N of M) and what the budget leaves."""
        used, cap = self._server_usage or (None, None)
        return {"calls": self._meter.calls, "server_used": used, "server_max": cap, **self._meter.remaining()}

    # --- the call gate ------------------------------------------------------------------
    def _call(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        self._meter.spend(f"{self.name}: {method} {httpx.URL(url).path}")
        with classify_http(rules=_salesforce_rule, clock=self._clock):
            response = self._client.request(method, url, auth=self._auth, **kwargs)
            self._note_usage(response)
            raise_for_status(response)
        return response

    def _get_page(self, url: str) -> Mapping[str, Any]:
        body = json_body(self._call("GET", url, headers=self._query_headers()))
        if not isinstance(body, Mapping):
            raise PermanentError(f"{self.name}: a query page is not a JSON object")
        return body

    def _query_records(self, soql: str) -> Iterator[Mapping[str, Any]]:
        first = self._call("GET", f"{self._base}/query", params={"q": soql}, headers=self._query_headers())
        for page in follow_next_link(self._client, json_body(first), get=self._get_page):
            yield from page.get("records") or []

    def _query_headers(self) -> dict[str, str]:
        return {"Sforce-Query-Options": f"batchSize={max(200, min(2000, self._page_size))}"}

    def _note_usage(self, response: httpx.Response) -> None:
        match = _USAGE.search(response.headers.get("Sforce-Limit-Info", ""))
        if match:
            self._server_usage = (int(match.group(1)), int(match.group(2)))

    def _signpost(self, response: httpx.Response) -> datetime:
        # Several Date values would mean a proxy added one: the earliest never runs ahead.
        stamps = []
        for value in response.headers.get_list("Date"):
            try:
                stamp = parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                continue
            stamps.append(stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC))
        server_now = min(stamps) if stamps else self._clock()
        return server_now.replace(microsecond=0) - self._safety_lag

    def _object(self, stream: str) -> SfObject:
        try:
            return self._objects[stream]
        except KeyError:
            raise PermanentError(f"{self.name}: no stream {stream!r}") from None


def _rejected(stream: str, record: Mapping[str, Any], exc: Exception) -> Rejected:
    """A record the API returned without what every change needs (Id, SystemModstamp)."""
    missing = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    reason = f"missing_{str(missing).lower()}" if missing else "unreadable_record"
    return Rejected(
        stream=stream,
        record=f"{stream}:{record.get('Id', '?')}",
        field=str(missing) if missing else None,
        reason=reason,
        payload={k: v for k, v in record.items() if k != "attributes"},
    )

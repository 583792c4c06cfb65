"""Change capture from NetSuite: SuiteQL over REST, keyed on ``(lastmodifieddate, id)``.

One ``read`` walks one stream forward from its cursor. Queries project every date with an
explicit ``TO_CHAR`` format and compare through ``TO_DATE`` with the same format, so neither
the integration user's display format nor a dropped seconds field can leak in; values are
read in ``query_zone`` (UTC when the integration user's time zone is GMT) and turned into
aware UTC datetimes. Rows are ordered by ``lastmodifieddate, id`` and paged with
``limit``/``offset``. Offsets are only trusted inside one query and one fixed upper bound
(the signpost: the server's ``Date`` when the walk began): a new query restarts from the last
row seen when the cap on rows per query draws near, when ``totalResults`` changes between
pages (rows left the set, so offsets shifted), or when the server stops serving pages early.
A fresh walk starts ``lookback`` before the watermark; the duplicates this re-reads carry the
same position and are absorbed by the journal.

Cursor: ``{"v": 1, "ts": ISO-8601 UTC, "id": internal id}`` (the watermark: the highest row
read), plus ``"walk": {"ts", "id", "until"}`` while a walk is unfinished (``Batch.more``), so
the next read resumes exactly where this one stopped, under the same signpost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from agent.errors import CursorUnavailable, PermanentError, RetryableError
from agent.model import Batch, Change, ChangeOp, Cursor
from connectors.base import content_digest
from connectors.http import classify_http, json_body, raise_for_status
from connectors.netsuite.errors import status_rule
from connectors.paging import offset_pages

logger = logging.getLogger(__name__)

SUITEQL_PATH = "/services/rest/query/v1/suiteql"
TS_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS'
DATE_FORMAT = "YYYY-MM-DD"
_TS_PY = "%Y-%m-%dT%H:%M:%S"
_MAX_RESTARTS = 50
_PAGES_PER_QUERY = 1000  # NetSuite serves at most 1000 pages of one query

#: How far behind the server's clock a walk stops (timestamps have whole seconds).
SAFETY_LAG = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What one stream selects: table, stamp and id columns, a type filter, projected columns."""

    stream: str
    record_type: str
    table: str
    stamp: str
    id_column: str
    op: ChangeOp
    filter: tuple[str, str] | None
    columns: tuple[str, ...]
    dates: frozenset[str] = frozenset()
    timestamps: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, order=True)
class Mark:
    """A position in a stream: a row's stamp and internal id."""

    ts: datetime
    id: int

    def as_dict(self) -> dict[str, str]:
        """Render for a cursor."""
        return {"ts": self.ts.strftime("%Y-%m-%dT%H:%M:%SZ"), "id": str(self.id)}


@dataclass(frozen=True, slots=True)
class _Row:
    mark: Mark
    change: Change


class SuiteQLReader:
    """Runs SuiteQL walks for the NetSuite connector and turns rows into ``Change``s."""

    def __init__(
        self,
        source: str,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        page_size: int,
        lookback: timedelta,
        query_cap: int,
        zone: tzinfo,
        clock: Callable[[], datetime],
        throttle_backoff: float,
    ) -> None:
        self._source = source
        self._client = client
        self._auth = auth
        self._page_size = page_size
        self._lookback = lookback
        self._query_cap = query_cap
        self._zone = zone
        self._clock = clock
        self._rule = status_rule(throttle_backoff)

    def read(self, spec: StreamSpec, cursor: Cursor | None, limit: int) -> Batch:
        """Return up to ``limit`` changes after ``cursor``; ``more`` when the walk is unfinished."""
        if limit < 1:
            raise ValueError("limit must be positive")
        watermark, walk, until = _parse_cursor(cursor)
        after = walk
        since = watermark.ts - self._lookback if watermark and walk is None else None
        size = max(1, min(self._page_size, limit))
        window = min(self._query_cap, _PAGES_PER_QUERY * size)
        rows: list[_Row] = []
        finished, restarts, retried_at = False, 0, None
        while len(rows) < limit:
            sql = self._sql(spec, since=since, after=after, until=until)
            bounded = until is not None
            outcome, more_in_page = "restart", False
            total0: Any = None
            served: list[datetime] = []
            offset = 0
            try:
                fetch = lambda off, q=sql, s=served: self._page(q, size, off, s)  # noqa: E731
                for page in offset_pages(fetch, page_size=size):
                    if until is None:
                        # Seconds resolution: a record read and changed again within the same
                        # second would share its position; stay a safety lag behind the server.
                        until = served[-1] - SAFETY_LAG
                    total = page.get("totalResults")
                    if total0 is not None and total != total0:
                        logger.info(
                            "event=netsuite_resultset_moved source=%s stream=%s", self._source, spec.stream
                        )
                        break
                    total0 = total
                    items = page.get("items") or []
                    for index, item in enumerate(items):
                        row = self._row(spec, item)
                        if row.mark.ts > until:
                            outcome = "end"
                            break
                        rows.append(row)
                        if len(rows) >= limit:
                            outcome, more_in_page = (
                                "full",
                                index < len(items) - 1 or bool(page.get("hasMore")),
                            )
                            break
                    if outcome != "restart":
                        break
                    served_to = offset + len(items)
                    if not page.get("hasMore"):
                        if isinstance(total, int) and total > served_to:
                            break  # the server stopped early (its own cap): re-query from here
                        outcome = "end"
                        break
                    offset += size
                    if not bounded or offset + size > window:
                        break
            except PermanentError:
                # A page past the server's row cap fails; re-query from the last row, once per row.
                position = rows[-1].mark if rows else None
                if offset == 0 or position == retried_at:
                    raise
                retried_at = position
            if outcome == "end":
                finished = True
                break
            if outcome == "full":
                finished = not more_in_page
                break
            restarts += 1
            if restarts > _MAX_RESTARTS:
                raise RetryableError(f"NetSuite {spec.table} kept changing during the read; try again")
            if rows:
                after, since = rows[-1].mark, None
        last = rows[-1].mark if rows else None
        high = max((m for m in (watermark, last) if m is not None), default=None)
        data: dict[str, Any] = {"v": 1, **(high.as_dict() if high else {})}
        if not finished and until is not None:
            position = last or walk or watermark
            if position is not None:
                data["walk"] = {**position.as_dict(), "until": until.strftime("%Y-%m-%dT%H:%M:%SZ")}
        return Batch([r.change for r in rows], Cursor(data), more=not finished)

    def fetch(self, spec: StreamSpec, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Return the current fields of the rows with internal ``ids``, as a read would carry them.

        One SuiteQL query per ``page_size`` ids (``id IN (...)``: no walk, no cursor); a row
        missing from the answer is absent from the result.
        """
        out: dict[int, dict[str, Any]] = {}
        size = self._page_size
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            conditions = [f"{spec.filter[0]} = {_quote(spec.filter[1])}"] if spec.filter else []
            conditions.append(f"{spec.id_column} IN ({', '.join(str(int(i)) for i in chunk)})")
            sql = (
                f"SELECT {', '.join(spec.columns)} FROM {spec.table}"
                f" WHERE {' AND '.join(conditions)} ORDER BY {spec.id_column}"
            )
            fetch = lambda off, q=sql: self._page(q, size, off, [])  # noqa: E731
            for page in offset_pages(fetch, page_size=size):
                for item in page.get("items") or []:
                    row = self._row(spec, item)
                    out[row.mark.id] = dict(row.change.fields)
        return out

    def probe(self, table: str, column: str, condition: tuple[str, str] | None) -> None:
        """Run a one-row query against ``table`` (raises the classified error when it fails)."""
        where = f" WHERE {condition[0]} = {_quote(condition[1])}" if condition else ""
        self._page(f"SELECT {column} FROM {table}{where}", 1, 0, [])

    def _page(self, sql: str, limit: int, offset: int, served: list[datetime]) -> Mapping[str, Any]:
        with classify_http(rules=self._rule, clock=self._clock):
            response = raise_for_status(
                self._client.post(
                    SUITEQL_PATH,
                    params={"limit": limit, "offset": offset},
                    json={"q": sql},
                    headers={"Prefer": "transient"},
                    auth=self._auth,
                )
            )
        served.append(self._server_time(response))
        body = json_body(response)
        if not isinstance(body, Mapping) or not isinstance(body.get("items", []), list):
            raise PermanentError("SuiteQL answered without an items list")
        return body

    def _server_time(self, response: httpx.Response) -> datetime:
        raw = response.headers.get("Date")
        try:
            moment = parsedate_to_datetime(raw) if raw else None
        except (TypeError, ValueError, IndexError):
            moment = None
        return (moment or self._clock()).astimezone(UTC).replace(microsecond=0)

    def _sql(
        self, spec: StreamSpec, *, since: datetime | None, after: Mark | None, until: datetime | None
    ) -> str:
        stamp, key = spec.stamp, spec.id_column
        conditions = []
        if spec.filter:
            conditions.append(f"{spec.filter[0]} = {_quote(spec.filter[1])}")
        if after is not None:
            at = self._to_date(after.ts)
            conditions.append(f"({stamp} > {at} OR ({stamp} = {at} AND {key} > {after.id}))")
        elif since is not None:
            conditions.append(f"{stamp} >= {self._to_date(since)}")
        if until is not None:
            conditions.append(f"{stamp} <= {self._to_date(until)}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return f"SELECT {', '.join(spec.columns)} FROM {spec.table}{where} ORDER BY {stamp}, {key}"

    def _to_date(self, moment: datetime) -> str:
        return f"TO_DATE('{moment.astimezone(self._zone).strftime(_TS_PY)}', '{TS_FORMAT}')"

    def _from_sql(self, text: Any) -> datetime:
        try:
            naive = datetime.strptime(str(text), _TS_PY)
        except ValueError as exc:
            raise PermanentError("SuiteQL returned a timestamp in an unexpected format") from exc
        return naive.replace(tzinfo=self._zone).astimezone(UTC)

    def _row(self, spec: StreamSpec, item: Mapping[str, Any]) -> _Row:
        raw_id = item.get(spec.id_column)
        if raw_id is None or not str(raw_id).isdigit() or spec.stamp not in item:
            raise PermanentError(f"SuiteQL row of {spec.table} lacks a numeric id or its stamp")
        mark = Mark(self._from_sql(item[spec.stamp]), int(raw_id))
        fields: dict[str, Any] = {}
        for column in _output_names(spec.columns):
            value = item.get(column)  # a missing key is a null
            if value is not None and column in spec.dates:
                value = date.fromisoformat(str(value))
            elif value is not None and (column in spec.timestamps or column == spec.stamp):
                value = self._from_sql(value)
            fields[column] = value
        version = mark.as_dict()["ts"]
        suffix = ":deleted" if spec.op == "delete" else ""
        change = Change(
            source=self._source,
            stream=spec.stream,
            object_name=spec.record_type,
            op=spec.op,
            key={"id": str(mark.id)},
            fields=fields,
            position=f"{spec.record_type}:{mark.id}@{version}{suffix}#{content_digest(fields)}",
            version=version,
            source_ts=mark.ts,
        )
        return _Row(mark, change)


def select_list(
    stamp: str, id_column: str, fields: tuple[str, ...], dates: frozenset[str], timestamps: frozenset[str]
) -> tuple[str, ...]:
    """Build the SELECT items: the id, the stamp and every field, dates through TO_CHAR."""
    items = [id_column, f"TO_CHAR({stamp}, '{TS_FORMAT}') AS {stamp}"]
    for name in fields:
        if name in (id_column, stamp):
            continue
        if name in dates:
            items.append(f"TO_CHAR({name}, '{DATE_FORMAT}') AS {name}")
        elif name in timestamps:
            items.append(f"TO_CHAR({name}, '{TS_FORMAT}') AS {name}")
        else:
            items.append(name)
    return tuple(items)


def _output_names(columns: tuple[str, ...]) -> Iterator[str]:
    for item in columns:
        yield item.rsplit(" AS ", 1)[-1] if " AS " in item else item


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _parse_cursor(cursor: Cursor | None) -> tuple[Mark | None, Mark | None, datetime | None]:
    if cursor is None:
        return None, None, None
    data = cursor.data
    if data.get("v") != 1:
        raise CursorUnavailable(f"unknown NetSuite cursor version {data.get('v')!r}")
    try:
        watermark = _mark(data) if "ts" in data else None
        walk_data = data.get("walk")
        if isinstance(walk_data, Mapping):
            until = _utc(str(walk_data["until"]))
            return watermark, _mark(walk_data), until
    except (KeyError, ValueError, TypeError) as exc:
        raise CursorUnavailable("malformed NetSuite cursor") from exc
    return watermark, None, None


def _mark(data: Mapping[str, Any]) -> Mark:
    raw_id = str(data["id"])
    if not raw_id.isdigit():
        raise ValueError("cursor id is not numeric")
    return Mark(_utc(str(data["ts"])), int(raw_id))


def _utc(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("cursor time without a zone")
    return moment.astimezone(UTC)

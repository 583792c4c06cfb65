"""HubSpot change capture: CRM search by modified time for updates, the archived list for deletes.

Search is not a change log (shared/reference/api-contracts.md §2.2, §8.1), so the walk is
built to lose nothing:

- The upper bound is a *signpost*: the server's ``Date`` at the poll's start minus a safety
  lag (search indexing lags writes). The cursor never passes it.
- Pages are keyset pages, not deep ``after`` offsets: each query restarts at the last fully
  seen timestamp (GTE) with ``after`` unset. An offset walk skips a record whenever one
  already passed is modified meanwhile (the result set shifts left under the offset), and it
  cannot go beyond the 10,000-result cap; restarting at the last timestamp avoids both, so a
  window never reaches the cap however many records it holds.
- Only one sort exists and ties come back in no useful order, so a timestamp's records are
  emitted only once all of them are known (a later timestamp was seen, or the query ran dry).
  A tie group that fills a whole page is walked by ``hs_object_id`` (EQ timestamp, GT id,
  sorted by id), which also covers more than 10,000 records in one millisecond.
- The cursor ``{"v": 1, "ts", "id"}`` means "everything up to (ts, id) is journaled". A poll
  that stops at ``limit`` adds ``"until"`` (its signpost) and the next read continues there
  without look-back; a finished poll moves ``ts`` to the signpost and the next poll starts
  ``lookback`` behind it, re-reading what late indexing may have hidden. Re-reads carry the
  same position (``id@modified``), so the journal absorbs them.
- Search never returns archived records: each poll scans ``archived=true`` and emits a
  delete for every record archived inside its window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from itertools import groupby
from typing import Any

from agent.errors import CursorUnavailable, PermanentError
from agent.model import Batch, Change, Cursor
from connectors.http import json_body
from connectors.hubspot.api import BATCH_MAX, LIST_PAGE_MAX, SEARCH_PAGE_MAX, HsObject, HubSpotApi
from connectors.paging import after_cursor_pages

logger = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_PRIMARY_TYPE_IDS = frozenset({5, 6, 1, 2})  # deal<->company and contact<->company "primary"
_SINGULAR = {"companies": "company", "contacts": "contact", "deals": "deal", "line_items": "line_item"}


@dataclass(frozen=True, slots=True)
class _Mark:
    """A watermark: every record before ``ts``, and at ``ts`` with id <= ``id``, is done."""

    ts: datetime
    id: int = -1


@dataclass(frozen=True, slots=True)
class _Hit:
    id: str
    ts: datetime
    record: Mapping[str, Any]


class ChangeReader:
    """Reads one source's HubSpot objects into ``Batch``es of changes (see the module doc)."""

    def __init__(
        self,
        api: HubSpotApi,
        source: str,
        *,
        lookback: timedelta,
        safety_lag: timedelta,
        page_size: int = SEARCH_PAGE_MAX,
    ) -> None:
        if not 1 <= page_size <= SEARCH_PAGE_MAX:
            raise ValueError(f"page_size must be 1..{SEARCH_PAGE_MAX}")
        self._api = api
        self._source = source
        self._lookback = lookback
        self._safety_lag = safety_lag
        self._page_size = page_size
        self._types: dict[str, Mapping[str, str]] = {}

    def read(self, obj: HsObject, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return the next changes of ``obj`` after ``cursor``: deletes first in a poll, then updates."""
        prev = decode_cursor(cursor)
        changes: list[Change] = []
        if prev is not None and prev.until is not None:  # continuing a poll cut short by limit
            start, signpost, floor = prev.mark, prev.until, prev.mark.ts
        else:
            if prev is None:
                start = _Mark(EPOCH)
            elif self._lookback > timedelta(0):
                start = _Mark(max(EPOCH, prev.mark.ts - self._lookback))
            else:
                start = prev.mark
            floor = prev.mark.ts if prev else EPOCH
            deletes, signpost = self._deletes(obj, start.ts)
            changes.extend(deletes)
        hits: list[_Hit] = []
        mark, more = start, len(changes) >= limit
        if not more:
            for ts, group in self._groups(obj, start, signpost):
                hits.extend(group)
                mark = _Mark(ts, int(group[-1].id))
                if len(changes) + len(hits) >= limit:
                    more = True
                    break
        changes.extend(self._updates(obj, hits))
        changes.sort(key=lambda c: (c.source_ts or EPOCH, int(c.key["id"])))
        if more:
            data = {"v": 1, "ts": iso_ms(mark.ts), "id": _id_text(mark.id), "until": iso_ms(signpost)}
        else:  # the whole window up to the signpost is read
            data = {"v": 1, "ts": iso_ms(max(signpost, floor)), "id": ""}
        logger.info(
            "event=hubspot_read source=%s stream=%s n=%s more=%s until=%s",
            self._source,
            obj.name,
            len(changes),
            more,
            data.get("until") or data["ts"],
        )
        return Batch(changes, Cursor(data), more)

    # --- deletes ------------------------------------------------------------------------
    def _deletes(self, obj: HsObject, lower: datetime) -> tuple[list[Change], datetime]:
        """Scan the archived list; return deletes in [lower, signpost] and the signpost."""
        signpost: datetime | None = None
        archived: list[Mapping[str, Any]] = []

        def fetch(after: str | None) -> Mapping[str, Any]:
            nonlocal signpost
            params: dict[str, str | int] = {
                "archived": "true",
                "limit": LIST_PAGE_MAX,
                "properties": ",".join(obj.properties),
            }
            if after:
                params["after"] = after
            response = self._api.call("GET", f"/crm/v3/objects/{obj.name}", params=params)
            if signpost is None:
                signpost = self._api.server_time(response) - self._safety_lag
            page: Mapping[str, Any] = json_body(response)
            return page

        for page in after_cursor_pages(fetch):
            archived.extend(page.get("results") or [])
        assert signpost is not None
        types = self._property_types(obj)
        out = []
        for record in archived:
            when = parse_instant(record.get("archivedAt"))
            if when is None or not lower <= when <= signpost:
                continue
            record_id = str(record["id"])
            out.append(
                Change(
                    source=self._source,
                    stream=obj.name,
                    object_name=obj.name,
                    op="delete",
                    key={"id": record_id},
                    fields=_fields(obj, record, types),
                    position=f"{record_id}@{iso_ms(when)}:archived",
                    version=iso_ms(when),
                    source_ts=when,
                )
            )
        return out, signpost

    # --- updates ------------------------------------------------------------------------
    def _groups(
        self, obj: HsObject, start: _Mark, signpost: datetime
    ) -> Iterator[tuple[datetime, list[_Hit]]]:
        """Yield (ts, hits ordered by id) such that everything up to (ts, last id) is then seen."""
        lo = start
        while lo.ts <= signpost:
            page = self._search(
                obj,
                [_flt(obj.modified_property, "GTE", lo.ts), _flt(obj.modified_property, "LTE", signpost)],
                obj.modified_property,
            )
            # The key is the value the server sorted by. A hit outside [lo, signpost], or above
            # the page's last one, was changed after indexing: it cannot steer the walk and is
            # left to a later page or poll (its new value is after our position).
            top = page[-1].ts if page else lo.ts
            usable = [h for h in page if lo.ts <= h.ts <= min(top, signpost)]
            if len(usable) < len(page) and len(page) == self._page_size:
                logger.warning(
                    "event=hubspot_search_out_of_order stream=%s n=%s", obj.name, len(page) - len(usable)
                )
            fresh = [h for h in usable if _after(h, lo)]
            if len(page) < self._page_size:  # the window is exhausted: every group is complete
                yield from _by_ts([h for h in page if _after(h, lo) and h.ts <= signpost])
                return
            if top <= lo.ts:  # one timestamp fills the page: walk it by record id
                yield from self._tie_walk(obj, lo)
                lo = _Mark(lo.ts + _MS)
                continue
            yield from _by_ts([h for h in fresh if h.ts < top])
            lo = _Mark(top)  # the group at ``top`` may continue on the next page

    def _tie_walk(self, obj: HsObject, lo: _Mark) -> Iterator[tuple[datetime, list[_Hit]]]:
        last = lo.id
        logger.info("event=hubspot_tie_walk stream=%s ts=%s", obj.name, iso_ms(lo.ts))
        while True:
            filters = [_flt(obj.modified_property, "EQ", lo.ts)]
            if last >= 0:
                filters.append({"propertyName": "hs_object_id", "operator": "GT", "value": str(last)})
            page = self._search(obj, filters, "hs_object_id")
            fresh = sorted((h for h in page if int(h.id) > last and h.ts == lo.ts), key=lambda h: int(h.id))
            if fresh:
                yield lo.ts, fresh
                last = int(fresh[-1].id)
            if len(page) < self._page_size or not fresh:
                return

    def _search(self, obj: HsObject, filters: list[dict[str, str]], sort: str) -> list[_Hit]:
        body = {
            "filterGroups": [{"filters": filters}],
            "sorts": [{"propertyName": sort, "direction": "ASCENDING"}],
            "properties": list(obj.properties),
            "limit": self._page_size,
        }
        page = self._api.json("POST", f"/crm/v3/objects/{obj.name}/search", body=body, search=True)
        hits = []
        for record in page.get("results") or []:
            props = record.get("properties") or {}
            ts = parse_instant(props.get(obj.modified_property) or record.get("updatedAt"))
            if ts is None:
                raise PermanentError(f"{obj.name} record has no {obj.modified_property}; cannot place it")
            hits.append(_Hit(str(record["id"]), ts, record))
        return hits

    def _updates(self, obj: HsObject, hits: Sequence[_Hit]) -> list[Change]:
        types = self._property_types(obj) if hits else {}
        linked = {to: self.linked(obj.name, to, [h.id for h in hits]) for to in obj.associations if hits}
        out = []
        for h in hits:
            fields = _fields(obj, h.record, types)
            for to, ids in linked.items():
                fields[f"associated_{_SINGULAR.get(to, to.rstrip('s'))}_id"] = ids.get(h.id)
            stamp = iso_ms(h.ts)
            out.append(
                Change(
                    source=self._source,
                    stream=obj.name,
                    object_name=obj.name,
                    op="update",
                    key={"id": h.id},
                    fields=fields,
                    position=f"{h.id}@{stamp}",
                    version=stamp,
                    source_ts=h.ts,
                )
            )
        return out

    def fetch(self, obj: HsObject, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The current fields of live records by id, as a read carries them; absent ids are left out.

        Batch read (``POST .../batch/read``, 100 ids a call; HubSpot answers 207 naming the
        ids it does not have, archived ones included), then one association batch read per
        associated object, as ``read`` does.
        """
        wanted = [i for i in dict.fromkeys(ids) if str(i).isdigit()]
        types = self._property_types(obj) if wanted else {}
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(wanted), BATCH_MAX):
            chunk = wanted[i : i + BATCH_MAX]
            body = {"inputs": [{"id": x} for x in chunk], "properties": list(obj.properties)}
            page = self._api.json("POST", f"/crm/v3/objects/{obj.name}/batch/read", body=body)
            for record in page.get("results") or []:
                if not record.get("archived"):
                    found[str(record["id"])] = _fields(obj, record, types)
        for to in obj.associations if found else ():
            linked = self.linked(obj.name, to, list(found))
            for rid, fields in found.items():
                fields[f"associated_{_SINGULAR.get(to, to.rstrip('s'))}_id"] = linked.get(rid)
        return found

    def linked(self, obj: str, to: str, ids: Sequence[str]) -> dict[str, str | None]:
        """The associated ``to`` record of each id (primary first, else the lowest id), batched."""
        out: dict[str, str | None] = dict.fromkeys(ids)
        for i in range(0, len(ids), BATCH_MAX):
            body = {"inputs": [{"id": x} for x in ids[i : i + BATCH_MAX]]}
            page = self._api.json("POST", f"/crm/v4/associations/{obj}/{to}/batch/read", body=body)
            for row in page.get("results") or []:
                out[str((row.get("from") or {}).get("id"))] = pick_associated(row.get("to") or [])
        return out

    def _property_types(self, obj: HsObject) -> Mapping[str, str]:
        if obj.name not in self._types:
            page = self._api.json("GET", f"/crm/v3/properties/{obj.name}")
            self._types[obj.name] = {
                str(p.get("name")): str(p.get("type")) for p in page.get("results") or []
            }
        return self._types[obj.name]


@dataclass(frozen=True, slots=True)
class CursorState:
    """A decoded HubSpot cursor: the watermark and, mid-poll, the poll's signpost."""

    mark: _Mark
    until: datetime | None


def decode_cursor(cursor: Cursor | None) -> CursorState | None:
    """Parse a stored cursor, refusing versions and shapes this connector never wrote."""
    if cursor is None:
        return None
    data = cursor.data
    ts = parse_instant(data.get("ts"))
    if data.get("v") != 1 or ts is None:
        raise CursorUnavailable("HubSpot cursor has an unknown version or no timestamp; rewind to a time")
    raw_id = str(data.get("id") or "")
    until = parse_instant(data.get("until")) if data.get("until") else None
    return CursorState(_Mark(ts, int(raw_id) if raw_id.isdigit() else -1), until)


def pick_associated(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Choose one associated record from v4 rows: a primary one if any, else the lowest id."""

    def primary(row: Mapping[str, Any]) -> bool:
        return any(
            t.get("typeId") in _PRIMARY_TYPE_IDS or t.get("label") == "Primary"
            for t in row.get("associationTypes") or []
        )

    ids = [(not primary(r), int(r["toObjectId"])) for r in rows if str(r.get("toObjectId", "")).isdigit()]
    return str(min(ids)[1]) if ids else None


def parse_instant(value: Any) -> datetime | None:
    """Parse HubSpot's ISO-8601 (``…Z``) or epoch-millisecond text into aware UTC, ms precision."""
    if value is None or value == "":
        return None
    text = str(value)
    if text.isdigit():
        return EPOCH + timedelta(milliseconds=int(text))
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso_ms(moment: datetime) -> str:
    """Render an instant as ISO-8601 UTC with milliseconds and ``Z`` (HubSpot's own format)."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _flt(prop: str, op: str, moment: datetime) -> dict[str, str]:
    return {"propertyName": prop, "operator": op, "value": str((moment - EPOCH) // _MS)}


def _after(hit: _Hit, mark: _Mark) -> bool:
    return hit.ts > mark.ts or (hit.ts == mark.ts and int(hit.id) > mark.id)


def _by_ts(hits: Sequence[_Hit]) -> Iterator[tuple[datetime, list[_Hit]]]:
    ordered = sorted(hits, key=lambda h: (h.ts, int(h.id)))
    for ts, group in groupby(ordered, key=lambda h: h.ts):
        yield ts, list(group)


def _fields(obj: HsObject, record: Mapping[str, Any], types: Mapping[str, str]) -> dict[str, Any]:
    props = record.get("properties") or {}
    return {name: _value(types.get(name), props.get(name)) for name in obj.properties if name in props}


def _value(kind: str | None, raw: Any) -> Any:
    """Numbers become exact ``Decimal``s; everything else stays the string HubSpot sent."""
    if kind == "number" and isinstance(raw, str) and raw:
        try:
            number = Decimal(raw)
        except InvalidOperation:
            return raw
        return number if number.is_finite() else raw
    return raw


def _id_text(value: int) -> str:
    return str(value) if value >= 0 else ""

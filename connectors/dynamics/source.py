"""Reading Dataverse tables: change-tracking delta walks, ``modifiedon`` polls and resyncs.

Cursors (the opaque ``Cursor.data`` of each stream)::

    {"v": 1, "mode": "delta", "delta": "<token>"}                  between delta walks
    {"v": 1, "mode": "delta", "delta": "<token>|null", "next": "/api/...?$skiptoken=..."}
                                                                    inside a walk (path only)
    {"v": 1, "mode": "modifiedon", "ts": "...Z", "id": "<guid>"}    between polls
    {"v": 1, "mode": "modifiedon", "ts", "id", "upto": "...Z", "from": "...Z|null"}
                                                                    inside a poll's walk
    {"v": 1, "mode": "resync", "after": "<guid>|null", "since": "...Z|null", "then": {...}}
                                                                    inside a resync

A ``read`` of a delta walk follows next links until it holds ``limit`` changes (page size =
min(page_size, limit)); mid-walk, the cursor keeps the next link's path and query (never the
host); the last page's delta token becomes the cursor. A ``modifiedon`` walk pages by keyset
``(modifiedon, primary key)`` up to a signpost taken from the server's clock; each new walk
starts ``lookback`` behind the watermark, so late writers are re-read (the journal absorbs the
duplicates). An expired delta token raises ``CursorUnavailable``: never a silent restart.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from agent.errors import AuthError, CursorUnavailable, PermanentError, SyncAgentError
from agent.model import Batch, Change, ChangeOp, Cursor
from connectors.dynamics.odata import format_datetime, literal
from connectors.dynamics.session import (
    DvSession,
    DvTable,
    delta_token_of,
    expired_token_rule,
    parse_timestamp,
)
from connectors.http import HttpStatusFailure
from connectors.paging import follow_next_link

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 5000
FETCH_CHUNK = 50  # keys per lookup query: 50 GUID comparisons keep the URL near 3 kB


class DvReader:
    """Turns Dataverse pages into ``Change`` batches with resumable cursors."""

    def __init__(self, source: str, session: DvSession, *, page_size: int, lookback: timedelta) -> None:
        self.source = source
        self.session = session
        self.page_size = page_size
        self.lookback = lookback

    # --- entry points ---------------------------------------------------------------------------
    def read(self, stream: str, table: DvTable, cursor: Cursor | None, limit: int) -> Batch:
        """Return the next batch of ``stream`` after ``cursor``."""
        data: Mapping[str, Any] = cursor.data if cursor is not None else {}
        if data and data.get("v") != 1:
            raise CursorUnavailable(f"dataverse stream {stream}: unknown cursor format {data.get('v')!r}")
        mode = data.get("mode") or ("delta" if table.change_tracking else "modifiedon")
        if mode == "resync":
            return self._resync_page(stream, table, data, limit)
        expected = "delta" if table.change_tracking else "modifiedon"
        if mode != expected:
            raise CursorUnavailable(
                f"dataverse stream {stream}: the cursor is a {mode} cursor but the table is configured "
                f"for {expected} reads; a resync is needed"
            )
        if mode == "delta":
            return self._delta(stream, table, data, limit)
        return self._poll(stream, table, data, limit)

    def resync(
        self, stream: str, table: DvTable, *, since: datetime | None, after_key: str | None, chunk: int
    ) -> Iterator[Batch]:
        """Re-read ``table`` in primary-key order as ``read`` changes, ending on a fresh cursor.

        The fresh cursor is taken *before* the scan (a delta token, or the server time for
        ``modifiedon`` tables), so changes made during the scan are read again afterwards.
        """
        if table.change_tracking:
            then: dict[str, Any] = {"v": 1, "mode": "delta", "delta": self._fresh_token(stream, table)}
        else:
            then = {
                "v": 1,
                "mode": "modifiedon",
                "ts": format_datetime(self.session.server_now()),
                "id": None,
            }
        state: Mapping[str, Any] = {
            "v": 1,
            "mode": "resync",
            "after": after_key,
            "since": format_datetime(since) if since is not None else None,
            "then": then,
        }
        logger.info("event=dataverse_resync_started stream=%s after_key=%s", stream, after_key is not None)
        while True:
            batch = self._resync_page(stream, table, state, chunk)
            yield batch
            if not batch.more:
                return
            state = batch.next_cursor.data

    # --- change tracking ------------------------------------------------------------------------
    def _delta(self, stream: str, table: DvTable, data: Mapping[str, Any], limit: int) -> Batch:
        token = data.get("delta")
        size = min(self.page_size, max(limit, 1))
        headers = {"Prefer": f"odata.track-changes, odata.maxpagesize={size}"}
        rule = expired_token_rule(stream)
        link = data.get("next")
        page: dict[str, Any] | None = None
        if link:
            try:
                page = self.session.get_json(self.session.absolute(link), headers=headers, rules=rule)
            except (AuthError, CursorUnavailable):
                raise
            except PermanentError:
                # A paging link is in-walk state: if the server refuses it, walk again from the
                # token (duplicates are absorbed downstream), never skip ahead.
                logger.warning("event=dataverse_next_link_refused stream=%s", stream)
        if page is None:
            params = {"$select": table.select()}
            if token:
                params["$deltatoken"] = token
            page = self.session.get_json(
                self.session.path(table.entity_set), params=params, headers=headers, rules=rule
            )
        op: ChangeOp = "update" if token else "read"
        changes: list[Change] = []
        last: Mapping[str, Any] = page
        pages = follow_next_link(
            self.session.client,
            page,
            next_key="@odata.nextLink",
            records_key="value",
            get=self._follow(headers, rule),
        )
        for last in pages:
            changes.extend(self._from_page(stream, table, last, op, token))
            if len(changes) >= limit:
                break
        if last.get("@odata.deltaLink"):
            cursor = {"v": 1, "mode": "delta", "delta": delta_token_of(str(last["@odata.deltaLink"]))}
            more = False
        elif last.get("@odata.nextLink"):
            cursor = {
                "v": 1,
                "mode": "delta",
                "delta": token,
                "next": self.session.local(str(last["@odata.nextLink"])),
            }
            more = True
        else:
            raise PermanentError(
                f"dataverse stream {stream}: a change-tracking page has neither a next nor a delta link"
            )
        logger.info("event=dataverse_delta_read stream=%s n=%s more=%s", stream, len(changes), more)
        return Batch(changes, Cursor(cursor), more)

    def _fresh_token(self, stream: str, table: DvTable) -> str:
        headers = {"Prefer": f"odata.track-changes, odata.maxpagesize={MAX_PAGE_SIZE}"}
        rule = expired_token_rule(stream)
        first = self.session.get_json(
            self.session.path(table.entity_set),
            params={"$select": table.primary_key},
            headers=headers,
            rules=rule,
        )
        pages = follow_next_link(
            self.session.client,
            first,
            next_key="@odata.nextLink",
            records_key="value",
            get=lambda url: self.session.get_json(
                self.session.absolute(self.session.local(url)), headers=headers
            ),
        )
        for page in pages:
            if page.get("@odata.deltaLink"):
                return delta_token_of(str(page["@odata.deltaLink"]))
        raise PermanentError(
            f"dataverse stream {stream}: the change-tracking walk ended without a delta link"
        )

    def _follow(
        self,
        headers: Mapping[str, str],
        rule: Callable[[HttpStatusFailure], SyncAgentError | None] | None,
    ) -> Callable[[str], Mapping[str, Any]]:
        def fetch(url: str) -> Mapping[str, Any]:
            return self.session.get_json(
                self.session.absolute(self.session.local(url)), headers=headers, rules=rule
            )

        return fetch

    # --- modifiedon polling ---------------------------------------------------------------------
    def _poll(self, stream: str, table: DvTable, data: Mapping[str, Any], limit: int) -> Batch:
        pk = table.primary_key
        ts, rid = data.get("ts"), data.get("id")
        if data.get("upto"):  # continue a walk: strictly after the last (modifiedon, id) returned
            upto, lower = str(data["upto"]), data.get("from")
            after = f"modifiedon gt {ts}"
            if rid:
                after = f"({after} or (modifiedon eq {ts} and {pk} gt {_guid(rid)}))"
            where = f"modifiedon le {upto} and {after}"
        else:  # a new walk: from lookback behind the watermark up to the server's now
            upto = format_datetime(self.session.server_now())
            lower = None
            where = f"modifiedon le {upto}"
            start = parse_timestamp(ts)
            if start is not None:
                lower = format_datetime(start - self.lookback)
                where = f"modifiedon ge {lower} and {where}"
        size = min(self.page_size, max(limit, 1))
        page = self.session.get_json(
            self.session.path(table.entity_set),
            params={"$select": table.select(), "$filter": where, "$orderby": f"modifiedon asc,{pk} asc"},
            headers={"Prefer": f"odata.maxpagesize={size}"},
        )
        op: ChangeOp = "update" if lower is not None else "read"
        changes = self._from_page(stream, table, page, op, None)
        mark = (ts, rid)
        rows = page.get("value") or []
        if rows:
            last = rows[-1]
            mark = (str(last.get("modifiedon")), str(last.get(pk)))
        more = bool(page.get("@odata.nextLink")) and bool(rows)
        cursor: dict[str, Any] = {"v": 1, "mode": "modifiedon"}
        if more:
            cursor.update(ts=mark[0], id=mark[1], upto=upto, **{"from": lower})
        else:  # the watermark never moves back (the old watermark row may have been deleted)
            best = _later((ts, rid), mark) if ts else mark
            cursor.update(ts=best[0], id=best[1])
        logger.info("event=dataverse_poll_read stream=%s n=%s more=%s", stream, len(changes), more)
        return Batch(changes, Cursor(cursor), more)

    # --- resync ---------------------------------------------------------------------------------
    def _resync_page(self, stream: str, table: DvTable, data: Mapping[str, Any], chunk: int) -> Batch:
        pk = table.primary_key
        parts = []
        if data.get("after"):
            parts.append(f"{pk} gt {_guid(data['after'])}")
        if data.get("since"):
            parts.append(f"modifiedon ge {data['since']}")
        params = {"$select": table.select(), "$orderby": f"{pk} asc"}
        if parts:
            params["$filter"] = " and ".join(parts)
        size = min(MAX_PAGE_SIZE, max(chunk, 1))
        page = self.session.get_json(
            self.session.path(table.entity_set),
            params=params,
            headers={"Prefer": f"odata.maxpagesize={size}"},
        )
        changes = self._from_page(stream, table, page, "read", None)
        rows = page.get("value") or []
        if page.get("@odata.nextLink") and rows:
            state = {**data, "after": str(rows[-1].get(pk))}
            return Batch(changes, Cursor(state), True)
        logger.info("event=dataverse_resync_done stream=%s", stream)
        return Batch(changes, Cursor(dict(data["then"])), False)

    # --- lookup by key --------------------------------------------------------------------------
    def fetch(self, table: DvTable, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The current fields of rows by primary key, as a change carries them; absent keys are left out.

        One ``$filter=pk eq g1 or pk eq g2 ...`` query per ``FETCH_CHUNK`` keys (short enough
        for any URL limit), following ``@odata.nextLink``; a key that is not a GUID matches nothing.
        """
        pk = table.primary_key
        keys = []
        for rid in dict.fromkeys(ids):
            try:
                keys.append(str(uuid.UUID(str(rid))))
            except ValueError:
                continue
        found: dict[str, dict[str, Any]] = {}
        headers = {"Prefer": f"odata.maxpagesize={self.page_size}"}
        for i in range(0, len(keys), FETCH_CHUNK):
            where = " or ".join(f"{pk} eq {literal(uuid.UUID(k))}" for k in keys[i : i + FETCH_CHUNK])
            first = self.session.get_json(
                self.session.path(table.entity_set),
                params={"$select": table.select(), "$filter": where},
                headers=headers,
            )
            pages = follow_next_link(
                self.session.client,
                first,
                next_key="@odata.nextLink",
                records_key="value",
                get=self._follow(headers, None),
            )
            for page in pages:
                for item in page.get("value") or []:
                    found[str(item.get(pk))] = {name: item.get(name) for name in table.fields}
        by_lower = {k.lower(): v for k, v in found.items()}
        return {rid: by_lower[str(rid).lower()] for rid in ids if str(rid).lower() in by_lower}

    # --- records --------------------------------------------------------------------------------
    def _from_page(
        self, stream: str, table: DvTable, page: Mapping[str, Any], op: ChangeOp, token: str | None
    ) -> list[Change]:
        out: list[Change] = []
        for item in page.get("value") or []:
            if "$deletedEntity" in str(item.get("@odata.context", "")):
                rid = str(item.get("id"))
                marker = f"deleted:{token}"
                key = {table.primary_key: rid}
                out.append(
                    Change(
                        self.source, stream, table.logical_name, "delete", key, {}, f"{rid}@{marker}", marker
                    )
                )
                continue
            rid = str(item.get(table.primary_key))
            version = item.get("versionnumber") or item.get("modifiedon")
            out.append(
                Change(
                    source=self.source,
                    stream=stream,
                    object_name=table.entity_set,
                    op=op,
                    key={table.primary_key: rid},
                    fields={name: item.get(name) for name in table.fields},
                    position=f"{rid}@{version}",
                    version=str(version),
                    source_ts=parse_timestamp(item.get("modifiedon")),
                )
            )
        return out


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _later(a: tuple[Any, Any], b: tuple[Any, Any]) -> tuple[Any, Any]:
    return max(a, b, key=lambda m: (parse_timestamp(m[0]) or _EPOCH, str(m[1] or "")))


def _guid(value: object) -> str:
    """A primary-key value as a bare OData GUID literal (Edm.Guid does not compare with strings)."""
    try:
        return literal(uuid.UUID(str(value)))
    except ValueError as exc:
        raise CursorUnavailable(f"cursor key {value!r} is not a GUID; a resync is needed") from exc

"""``HubSpotConnector``: the HubSpot CRM as a ``Source`` and a ``Sink``, plus deal associations.

Reads are in ``connectors/hubspot/source.py`` (search walk, archived scan), writes in
``connectors/hubspot/sink.py`` (batch upsert/update/archive with bisection), HTTP details in
``connectors/hubspot/api.py``. Usage::

    client = make_client("https://api.hubapi.com")
    hubspot = HubSpotConnector(
        "hubspot", client, auth=BearerAuth(StaticToken(Secret("pat-na1-..."))),
        objects={"deals": HsObject("deals", ("dealname", "amount", "dealstage"), "erp_id",
                                   associations=("companies",))},
    )
    batch = hubspot.read("deals", cursor, limit=500)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx

from agent.errors import AuthError, PermanentError, SyncAgentError
from agent.model import Batch, Cursor, Op, Outcome, Problem, utcnow
from connectors.http import json_body
from connectors.hubspot.api import HsObject, HubSpotApi
from connectors.hubspot.sink import BatchWriter
from connectors.hubspot.source import ChangeReader, iso_ms, pick_associated
from connectors.paging import after_cursor_pages


class HubSpotConnector:
    """Captures HubSpot object changes and applies ops to them (Source and Sink)."""

    def __init__(
        self,
        name: str,
        client: httpx.Client,
        *,
        auth: httpx.Auth,
        objects: Mapping[str, HsObject],
        lookback: timedelta = timedelta(seconds=120),
        clock: Callable[[], datetime] = utcnow,
        search_rate_per_s: float = 4.0,
        safety_lag: timedelta = timedelta(seconds=5),
        page_size: int = 200,
    ) -> None:
        self.name = name
        self.objects = dict(objects)
        self.api = HubSpotApi(client, auth, clock=clock, search_rate_per_s=search_rate_per_s)
        self._reader = ChangeReader(
            self.api, name, lookback=lookback, safety_lag=safety_lag, page_size=page_size
        )
        self._writer = BatchWriter(self.api, self.objects)

    # --- Source -------------------------------------------------------------------------
    def streams(self) -> Sequence[str]:
        """One stream per configured object."""
        return tuple(self.objects)

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Read the next changes of ``stream`` after ``cursor`` (None: from the beginning)."""
        return self._reader.read(self._object(stream), cursor, limit=limit)

    def cursor_for_time(self, stream: str, when: datetime) -> Cursor:
        """A cursor that re-reads ``stream`` from ``when`` (an operator's rewind)."""
        return Cursor({"v": 1, "ts": iso_ms(when), "id": ""})

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Nothing to acknowledge: HubSpot keeps no read position for us."""

    # --- Sink ---------------------------------------------------------------------------
    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` (upserts by unique property or id, deletes by archive), in order."""
        return self._writer.apply(ops)

    # --- Lookup (reconciliation) ---------------------------------------------------------
    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return the current records of ``object_name`` by id; ``None`` where archived or never there.

        Batch reads of 100 ids, with the properties (and associated ids) a change of the
        object carries, so reconciliation compares what capture would have seen.
        """
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        found = self._reader.fetch(self._object(object_name), list(out))
        for rid in out:
            out[rid] = found.get(rid)
        return out

    # --- associations -------------------------------------------------------------------
    def associate(self, deal_id: str, company_id: str) -> None:
        """Link a deal to a company with the default (unlabeled) association."""
        self.api.call("PUT", f"/crm/v4/objects/deals/{deal_id}/associations/default/companies/{company_id}")

    def company_of(self, deal_id: str) -> str | None:
        """The deal's company id: the primary association if any, else the lowest id; None if none."""
        rows: list[Any] = []

        def fetch(after: str | None) -> Mapping[str, Any]:
            params = {"limit": 500, **({"after": after} if after else {})}
            page: Mapping[str, Any] = self.api.json(
                "GET", f"/crm/v4/objects/deals/{deal_id}/associations/companies", params=params
            )
            return page

        for page in after_cursor_pages(fetch):
            rows.extend(page.get("results") or [])
        return pick_associated(rows)

    # --- check --------------------------------------------------------------------------
    def check(self) -> list[Problem]:
        """Check the token against every object and that every configured property exists."""
        problems: list[Problem] = []
        for obj in self.objects.values():
            subject = f"{self.name}.{obj.name}"
            try:
                self.api.call("GET", f"/crm/v3/objects/{obj.name}", params={"limit": 1})
                page = json_body(self.api.call("GET", f"/crm/v3/properties/{obj.name}"))
            except AuthError as exc:
                problems.append(
                    Problem(
                        subject,
                        f"HubSpot refused the token: {exc}",
                        "check the private-app token (or OAuth refresh token) and its scopes",
                    )
                )
                continue
            except SyncAgentError as exc:
                problems.append(
                    Problem(subject, f"HubSpot is not reachable: {exc}", "check base_url and network")
                )
                continue
            problems.extend(_property_problems(subject, obj, page.get("results") or []))
        return problems

    def _object(self, stream: str) -> HsObject:
        try:
            return self.objects[stream]
        except KeyError:
            raise PermanentError(f"{self.name} has no stream {stream!r}") from None


def _property_problems(
    subject: str, obj: HsObject, definitions: Sequence[Mapping[str, Any]]
) -> list[Problem]:
    defs = {str(d.get("name")): d for d in definitions}
    problems = []
    missing = [p for p in obj.properties if p not in defs]
    if missing:
        hint = " (contacts use lastmodifieddate)" if obj.modified_property in missing else ""
        problems.append(
            Problem(
                subject,
                f"properties do not exist: {', '.join(missing)}{hint}",
                "create them in HubSpot or fix the object's field list",
            )
        )
    for to in obj.associations:
        if to not in ("companies", "contacts", "deals", "line_items"):
            problems.append(
                Problem(
                    subject,
                    f"association target {to!r} is not a known object",
                    "use companies, contacts, deals or line_items",
                    "warning",
                )
            )
    if obj.id_property == "hs_object_id":
        problems.append(
            Problem(
                subject,
                "hs_object_id cannot be an upsert idProperty",
                "leave id_property empty for updates by id, or use a unique custom property",
            )
        )
    elif obj.id_property and obj.id_property in defs and not defs[obj.id_property].get("hasUniqueValue"):
        problems.append(
            Problem(
                subject,
                f"{obj.id_property} is not a unique-value property",
                "upserts need a property created with 'Require unique values'",
            )
        )
    return problems

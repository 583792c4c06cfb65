"""A stateful HubSpot CRM emulator: v3 objects, search, batch writes, v4 associations, OAuth.

It reproduces the behaviours a poller can lose data on (shared/reference/api-contracts.md §2,
§7): all property values are strings; ``hs_lastmodifieddate`` (``lastmodifieddate`` on contacts)
has millisecond precision and many records may share one value; search pages are at most 200,
``after`` is a numeric offset, only one sort is allowed, ties come back in an order unrelated
to the record id, paging past ``search_cap`` (10,000) answers 400, records become searchable
only ``index_lag_ms`` after a change and archived ones never; search has its own per-second
limit and sends no rate-limit headers, every other call counts against a 10-second burst
window and a daily budget and says so in ``X-HubSpot-RateLimit-*`` headers. Batch writes take
at most 100 inputs, and one invalid or conflicting input fails the whole batch (400/409).
Records live in ``_store.py``, typed values and filters in ``_values.py``; this is the HTTP face.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from connectors.emulator import EmulatorApp, EmuRequest, EmuResponse
from connectors.hubspot._store import OBJECT_TYPE_IDS, Store, WriteItem
from connectors.hubspot._values import (
    StoreError,
    csv_arg,
    error_body,
    int_arg,
    invalid_message,
    rate_body,
    seconds_text,
    stamp,
)

_OBJ = r"/crm/(?:v3/objects|objects/\d{4}-\d{2})/(?P<obj>[^/]+)"
_PROPS = r"/crm/(?:v3/properties|properties/\d{4}-\d{2})/(?P<obj>[^/]+)"
_ASSOC = r"/crm/(?:v4/objects|objects/\d{4}-\d{2})/(?P<obj>[^/]+)/(?P<id>[^/]+)/associations"
_ASSOC_BATCH = r"/crm/(?:v4/associations|associations/\d{4}-\d{2})/(?P<obj>[^/]+)/(?P<to>[^/]+)/batch"
HandlerFn = Callable[[EmuRequest], EmuResponse]


class HubSpotEmulator(EmulatorApp):
    """A loopback HubSpot account with companies, deals and contacts, and its limits as knobs."""

    def __init__(
        self,
        *,
        tokens: Sequence[str] = ("pat-na1-emulator",),
        client_id: str = "emulator-client",
        client_secret: str = "emulator-secret",
        refresh_token: str = "emulator-refresh",
        token_ttl_s: int = 1800,
        search_cap: int = 10_000,
        search_page_max: int = 200,
        search_rate_per_s: int = 5,
        search_body_max: int = 3000,
        burst_limit: int = 100,
        burst_window_s: float = 10.0,
        daily_limit: int = 250_000,
        index_lag_ms: int = 0,
        tie_order: str = "scrambled",
        whole_batch_errors: bool = True,
        association_bumps_modified: bool = False,
        archive_retention_days: float = 90,
    ) -> None:
        super().__init__()
        self.store = Store(
            self.now,
            index_lag=timedelta(milliseconds=index_lag_ms),
            tie_order=tie_order,
            association_bumps_modified=association_bumps_modified,
            archive_retention=timedelta(days=archive_retention_days),
        )
        self.tokens = set(tokens)
        self.client_id, self.client_secret, self.refresh_token = client_id, client_secret, refresh_token
        self.token_ttl_s = token_ttl_s
        self.search_cap, self.search_page_max = search_cap, search_page_max
        self.search_rate_per_s, self.search_body_max = search_rate_per_s, search_body_max
        self.burst_limit, self.burst_window_s, self.daily_limit = burst_limit, burst_window_s, daily_limit
        self.whole_batch_errors = whole_batch_errors
        self._oauth: dict[str, datetime] = {}
        self._search_times: deque[float] = deque()
        self._burst_times: deque[float] = deque()
        self._daily_used = 0
        self._register()

    # --- direct data access for tests and the demo ----------------------------------
    def insert(self, obj: str, props: Mapping[str, Any], *, at: datetime | None = None) -> str:
        """Create a record without HTTP; returns its id (``at`` sets create/modify time)."""
        with self._lock:
            return self.store.create(obj, props, at=at).id

    def update(
        self, obj: str, record_id: str, props: Mapping[str, Any], *, at: datetime | None = None
    ) -> None:
        """Change a record's properties without HTTP (bumps its modified time)."""
        with self._lock:
            self.store.modify(obj, self.store.record(obj, record_id), props, at=at)

    def archive(self, obj: str, record_id: str, *, at: datetime | None = None) -> None:
        """Archive (soft-delete) a record without HTTP."""
        with self._lock:
            self.store.archive(obj, self.store.record(obj, record_id), at=at)

    def restore(self, obj: str, record_id: str, *, at: datetime | None = None) -> None:
        """Bring an archived record back (bumps its modified time)."""
        with self._lock:
            self.store.restore(obj, self.store.record(obj, record_id, archived=True), at=at)

    def get(self, obj: str, record_id: str) -> dict[str, Any]:
        """Return a record as the API renders it, with every property (archived ones too)."""
        with self._lock:
            rec = self.store.record(obj, record_id, archived=None)
            return self.store.render(obj, rec, None)

    def all(self, obj: str, *, archived: bool = False) -> list[dict[str, Any]]:
        """Return every live (or every archived) record of ``obj``, ordered by id."""
        with self._lock:
            return [self.store.render(obj, r, None) for r in self.store.records(obj, archived=archived)]

    def associate(
        self, from_obj: str, from_id: str, to_obj: str, to_id: str, type_id: int | None = None
    ) -> None:
        """Associate two records (default unlabeled type unless ``type_id``), both directions."""
        with self._lock:
            self.store.associate(from_obj, from_id, to_obj, to_id, type_id)

    def associated(self, from_obj: str, from_id: str, to_obj: str) -> list[str]:
        """Return the ids of ``to_obj`` records associated with one record, ordered by id."""
        with self._lock:
            return sorted(self.store.associations(from_obj, from_id, to_obj), key=int)

    def define_property(self, obj: str, name: str, *, type: str = "string", unique: bool = False) -> None:  # noqa: A002
        """Add a custom property (``unique`` makes it usable as an upsert ``idProperty``)."""
        with self._lock:
            self.store.define_property(obj, name, type, unique=unique)

    def settle_index(self) -> None:
        """Make every pending change searchable now, as if the index lag had passed."""
        with self._lock:
            self.store.settle_index()

    def expire_all_tokens(self) -> None:
        """Expire every OAuth access token issued so far (private-app tokens never expire)."""
        with self._lock:
            past = self.now() - timedelta(seconds=1)
            self._oauth = dict.fromkeys(self._oauth, past)

    def issue_token(self) -> str:
        """Mint an OAuth access token directly, as the token endpoint would."""
        with self._lock:
            token = "emu-oauth-" + secrets.token_hex(12)
            self._oauth[token] = self.now() + timedelta(seconds=self.token_ttl_s)
            return token

    def seed_demo(self) -> None:
        """Fill the account with a few companies and deals (data only, no faults)."""
        companies = [
            {"name": "Acme Consulting GmbH", "domain": "acme.example", "erp_id": "C-10042", "country": "DE"},
            {"name": "Globex Services Ltd", "domain": "globex.example", "erp_id": "C-10043", "country": "GB"},
            {"name": "Initech Advisory", "domain": "initech.example", "country": "US"},
        ]
        deals = [
            ("Acme - Phase 2", "48000", "closedwon", 0),
            ("Globex rollout", "125000.50", "contractsent", 1),
            ("Initech audit", "9000", "qualifiedtobuy", 2),
        ]
        ids = [self.insert("companies", c) for c in companies]
        for name, amount, stage, company in deals:
            deal = self.insert(
                "deals",
                {
                    "dealname": name,
                    "amount": amount,
                    "dealstage": stage,
                    "pipeline": "default",
                    "closedate": "2026-06-30T00:00:00.000Z",
                },
            )
            self.associate("deals", deal, "companies", ids[company])

    # --- fault helpers ------------------------------------------------------------------
    def fail_next(
        self,
        status: int = 500,
        *,
        count: int = 1,
        category: str | None = None,
        message: str = "Internal error",
        retry_after: float | None = None,
        path_prefix: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ``status`` and a HubSpot error body."""
        headers = {"Retry-After": seconds_text(retry_after)} if retry_after is not None else {}
        body = error_body(category or ("INTERNAL_ERROR" if status >= 500 else "VALIDATION_ERROR"), message)
        self.inject(EmuResponse(status, body, headers), count=count, path_prefix=path_prefix, method=method)

    def throttle_next(
        self,
        *,
        policy: str = "TEN_SECONDLY_ROLLING",
        count: int = 1,
        retry_after: float | None = None,
        path_prefix: str | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with 429 and ``policyName`` ``policy``."""
        headers = {"Retry-After": seconds_text(retry_after)} if retry_after is not None else {}
        self.inject(EmuResponse(429, rate_body(policy), headers), count=count, path_prefix=path_prefix)

    def slow_next(self, seconds: float, *, count: int = 1, path_prefix: str | None = None) -> None:
        """Delay the next ``count`` matching requests by ``seconds`` before answering."""
        self.inject(None, count=count, delay=seconds, path_prefix=path_prefix)

    def not_found(self, request: EmuRequest) -> EmuResponse:
        """Answer an unknown path in HubSpot's error shape."""
        return EmuResponse(404, error_body("OBJECT_NOT_FOUND", "Resource not found"))

    # --- routing ------------------------------------------------------------------------
    def _register(self) -> None:
        api = self._api
        self.route("POST", r"/oauth/v1/token", self._token)
        self.route("GET", _PROPS, api(self._properties))
        self.route("GET", _PROPS + r"/(?P<name>[^/]+)", api(self._property))
        self.route("POST", _OBJ + r"/search", api(self._search, search=True))
        for verb in ("read", "create", "update", "upsert", "archive"):
            self.route("POST", _OBJ + r"/batch/" + verb, api(getattr(self, "_batch_" + verb)))
        self.route("GET", _OBJ, api(self._list))
        self.route("POST", _OBJ, api(self._create_one))
        self.route("GET", _OBJ + r"/(?P<id>[^/]+)", api(self._get_one))
        self.route("PATCH", _OBJ + r"/(?P<id>[^/]+)", api(self._update_one))
        self.route("DELETE", _OBJ + r"/(?P<id>[^/]+)", api(self._archive_one))
        self.route("PUT", _ASSOC + r"/default/(?P<to>[^/]+)/(?P<to_id>[^/]+)", api(self._assoc_default))
        self.route("PUT", _ASSOC + r"/(?P<to>[^/]+)/(?P<to_id>[^/]+)", api(self._assoc_labeled))
        self.route("DELETE", _ASSOC + r"/(?P<to>[^/]+)/(?P<to_id>[^/]+)", api(self._assoc_remove))
        self.route("GET", _ASSOC + r"/(?P<to>[^/]+)", api(self._assoc_list))
        self.route("POST", _ASSOC_BATCH + r"/read", api(self._assoc_batch_read))

    def _api(self, handler: HandlerFn, *, search: bool = False) -> HandlerFn:
        def serve(request: EmuRequest) -> EmuResponse:
            kind = self._authenticate(request)
            if isinstance(kind, EmuResponse):
                return kind
            limited, headers = self._search_gate() if search else self._burst_gate(kind)
            if limited is not None:
                return limited
            try:
                response = handler(request)
            except StoreError as exc:
                response = EmuResponse(exc.status, exc.body)
            if headers:
                response = EmuResponse(response.status, response.body, {**response.headers, **headers})
            return response

        return serve

    # --- auth and limits ------------------------------------------------------------------
    def _authenticate(self, request: EmuRequest) -> str | EmuResponse:
        header = request.header("authorization") or ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if token in self.tokens:
            return "private"
        expires = self._oauth.get(token)
        if expires is not None and expires > self.now():
            return "oauth"
        message = (
            "The OAuth token used to make this call expired."
            if expires is not None
            else "Authentication credentials not found."
        )
        return EmuResponse(401, error_body("INVALID_AUTHENTICATION", message))

    def _search_gate(self) -> tuple[EmuResponse | None, dict[str, str]]:
        now = time.monotonic()
        while self._search_times and now - self._search_times[0] >= 1.0:
            self._search_times.popleft()
        if len(self._search_times) >= self.search_rate_per_s:
            return EmuResponse(429, rate_body("SECONDLY")), {}
        self._search_times.append(now)
        return None, {}

    def _burst_gate(self, kind: str) -> tuple[EmuResponse | None, dict[str, str]]:
        now = time.monotonic()
        while self._burst_times and now - self._burst_times[0] >= self.burst_window_s:
            self._burst_times.popleft()
        headers = {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(self.burst_window_s * 1000)),
            "X-HubSpot-RateLimit-Max": str(self.burst_limit),
        }
        if kind == "private":  # daily headers are not sent to OAuth apps
            headers["X-HubSpot-RateLimit-Daily"] = str(self.daily_limit)
        if self._daily_used >= self.daily_limit:
            return EmuResponse(429, rate_body("DAILY"), headers), {}
        if len(self._burst_times) >= self.burst_limit:
            headers["X-HubSpot-RateLimit-Remaining"] = "0"
            return EmuResponse(429, rate_body("TEN_SECONDLY_ROLLING"), headers), {}
        self._burst_times.append(now)
        self._daily_used += 1
        headers["X-HubSpot-RateLimit-Remaining"] = str(self.burst_limit - len(self._burst_times))
        if kind == "private":
            headers["X-HubSpot-RateLimit-Daily-Remaining"] = str(self.daily_limit - self._daily_used)
        return None, headers

    def _token(self, request: EmuRequest) -> EmuResponse:
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}

        def refuse(status: str, message: str) -> EmuResponse:
            return EmuResponse(
                400, {"status": status, "message": message, "correlationId": str(uuid.uuid4())}
            )

        if form.get("grant_type") != "refresh_token":
            return refuse("BAD_GRANT_TYPE", "grant_type must be refresh_token")
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return refuse("BAD_CLIENT_ID", "unknown client_id or wrong client_secret")
        if form.get("refresh_token") != self.refresh_token:
            return refuse("BAD_REFRESH_TOKEN", "missing or unknown refresh token")
        token = self.issue_token()
        return EmuResponse(
            200,
            {
                "token_type": "bearer",
                "access_token": token,
                "refresh_token": self.refresh_token,
                "expires_in": self.token_ttl_s,
            },
        )

    # --- properties ---------------------------------------------------------------------
    def _properties(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        return EmuResponse(200, {"results": self.store.property_list(obj)})

    def _property(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        return EmuResponse(200, self.store.property_json(obj, request.match["name"]))

    # --- search ---------------------------------------------------------------------------
    def _search(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        if len(request.body) > self.search_body_max:
            raise StoreError(
                400, "VALIDATION_ERROR", f"Request body exceeds {self.search_body_max} characters"
            )
        body = request.json() or {}
        limit = int_arg(body.get("limit", 10), "limit")
        after = int_arg(body.get("after") or 0, "after")
        if not 0 <= limit <= self.search_page_max:
            raise StoreError(400, "VALIDATION_ERROR", f"limit must be between 0 and {self.search_page_max}")
        if after >= self.search_cap:
            raise StoreError(
                400,
                "VALIDATION_ERROR",
                f"Search results are limited to {self.search_cap}; narrow the query instead of paging",
            )
        matched = self.store.search(obj, body)
        end = min(after + limit, self.search_cap, len(matched))
        props = body.get("properties") or None
        out: dict[str, Any] = {
            "total": len(matched),
            "results": [self.store.render(obj, rec, props, view=view) for rec, view in matched[after:end]],
        }
        if end < len(matched):
            out["paging"] = {"next": {"after": str(end)}}
        return EmuResponse(200, out)

    # --- list and single-record endpoints -----------------------------------------------
    def _list(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        limit = int_arg(request.arg("limit", "10"), "limit")
        if not 1 <= limit <= 100:
            raise StoreError(400, "VALIDATION_ERROR", "limit must be between 1 and 100")
        start = int_arg(request.arg("after", "0") or "0", "after")
        archived = (request.arg("archived", "false") or "").lower() == "true"
        records = [r for r in self.store.records(obj, archived=archived) if int(r.id) >= start]
        props = csv_arg(request.query.get("properties"))
        assoc = csv_arg(request.query.get("associations"))
        out: dict[str, Any] = {
            "results": [self.store.render(obj, r, props or None, associations=assoc) for r in records[:limit]]
        }
        if len(records) > limit:
            out["paging"] = {"next": {"after": records[limit].id, "link": f"?after={records[limit].id}"}}
        return EmuResponse(200, out)

    def _get_one(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        archived = (request.arg("archived", "false") or "").lower() == "true"
        rec = self.store.lookup(obj, request.match["id"], request.arg("idProperty"), archived=archived)
        props = csv_arg(request.query.get("properties"))
        return EmuResponse(
            200,
            self.store.render(
                obj, rec, props or None, associations=csv_arg(request.query.get("associations"))
            ),
        )

    def _create_one(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        body = request.json() or {}
        rec = self.store.create(obj, body.get("properties") or {})
        for assoc in body.get("associations") or []:
            to_id = str((assoc.get("to") or {}).get("id"))
            types = assoc.get("types") or [{}]
            self.store.associate_any(obj, rec.id, to_id, types[0].get("associationTypeId"))
        return EmuResponse(201, self.store.render(obj, rec, None))

    def _update_one(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        rec = self.store.lookup(obj, request.match["id"], request.arg("idProperty"))
        self.store.modify(obj, rec, (request.json() or {}).get("properties") or {})
        return EmuResponse(200, self.store.render(obj, rec, None))

    def _archive_one(self, request: EmuRequest) -> EmuResponse:
        obj = self.store.object_name(request.match["obj"])
        rec = self.store.find(obj, request.match["id"])
        if rec is not None:
            self.store.archive(obj, rec)
        return EmuResponse(204)

    # --- batch endpoints ----------------------------------------------------------------
    def _inputs(self, request: EmuRequest) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        obj = self.store.object_name(request.match["obj"])
        body = request.json() or {}
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise StoreError(400, "VALIDATION_ERROR", "inputs must be a non-empty list")
        if len(inputs) > 100:
            raise StoreError(400, "VALIDATION_ERROR", "A batch may hold at most 100 inputs")
        return obj, inputs, body

    def _batch_read(self, request: EmuRequest) -> EmuResponse:
        obj, inputs, body = self._inputs(request)
        id_prop = body.get("idProperty")
        archived = (request.arg("archived", "false") or "").lower() == "true"
        results, missing = [], []
        for item in inputs:
            rec = self.store.find(obj, str(item.get("id")), id_prop, archived=archived)
            if rec is None:
                missing.append(str(item.get("id")))
            else:
                results.append(self.store.render(obj, rec, body.get("properties") or None))
        errors = [self.store.not_found_error(obj, missing)] if missing else []
        return self._batch_response(results, errors, ok=200)

    def _batch_create(self, request: EmuRequest) -> EmuResponse:
        obj, inputs, _ = self._inputs(request)
        items: list[WriteItem] = [(None, None, dict(i.get("properties") or {}), None) for i in inputs]
        return self._write(obj, items, ok=201)

    def _batch_update(self, request: EmuRequest) -> EmuResponse:
        obj, inputs, _ = self._inputs(request)
        items: list[WriteItem] = []
        for i in inputs:
            ref = str(i.get("id"))
            rec = self.store.find(obj, ref, i.get("idProperty"))
            if rec is None:
                items.append((ref, None, {}, self.store.not_found_error(obj, [ref])))
            else:
                items.append((ref, rec, dict(i.get("properties") or {}), None))
        self.store.reject_duplicate_refs([r for r, *_ in items])
        return self._write(obj, items, ok=200)

    def _batch_upsert(self, request: EmuRequest) -> EmuResponse:
        obj, inputs, _ = self._inputs(request)
        items: list[WriteItem] = []
        for i in inputs:
            id_prop = i.get("idProperty") or request.arg("idProperty")
            if not id_prop:
                raise StoreError(400, "VALIDATION_ERROR", "Each upsert input needs an idProperty")
            self.store.require_unique(obj, str(id_prop))
            ref = str(i.get("id"))
            props = {**dict(i.get("properties") or {}), str(id_prop): ref}
            items.append((ref, self.store.find(obj, ref, str(id_prop)), props, None))
        self.store.reject_duplicate_refs([r for r, *_ in items])
        return self._write(obj, items, ok=200, upsert=True)

    def _batch_archive(self, request: EmuRequest) -> EmuResponse:
        obj, inputs, _ = self._inputs(request)
        for item in inputs:
            rec = self.store.find(obj, str(item.get("id")))
            if rec is not None:
                self.store.archive(obj, rec)
        return EmuResponse(204)

    def _write(self, obj: str, items: Sequence[WriteItem], *, ok: int, upsert: bool = False) -> EmuResponse:
        """Validate every input, then fail the whole batch or apply the valid ones (207)."""
        plans = self.store.plan(obj, items)
        failures = [p for p in plans if p.error is not None]
        fatal = [p for p in failures if p.status in (400, 409)]
        if fatal and self.whole_batch_errors:  # missing ids (404) stay per-record, as in a 207
            worst = 409 if any(p.status == 409 for p in fatal) else 400
            if worst == 409:
                raise StoreError(409, "CONFLICT", "A unique property value is already used by another record")
            raise StoreError(400, "VALIDATION_ERROR", invalid_message([e for p in fatal for e in p.invalid]))
        results = []
        for plan in plans:
            if plan.error is None:
                rec, new = self.store.apply(obj, plan)
                rendered = self.store.render(obj, rec, list(plan.props))
                if upsert:
                    rendered["new"] = new
                results.append(rendered)
        return self._batch_response(results, [p.error for p in failures if p.error], ok=ok)

    def _batch_response(self, results: list[Any], errors: list[dict[str, Any]], *, ok: int) -> EmuResponse:
        started = stamp(self.now())
        body: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": stamp(self.now()),
        }
        if errors:
            body["errors"], body["numErrors"] = errors, len(errors)
            return EmuResponse(207, body)
        return EmuResponse(ok, body)

    # --- associations v4 ----------------------------------------------------------------
    def _assoc_default(self, request: EmuRequest) -> EmuResponse:
        m = request.match
        obj, to = self.store.object_name(m["obj"]), self.store.object_name(m["to"])
        type_id, reverse = self.store.associate(obj, m["id"], to, m["to_id"], None)
        results = [
            {
                "from": {"id": a},
                "to": {"id": b},
                "associationSpec": {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": t},
            }
            for a, b, t in ((m["id"], m["to_id"], type_id), (m["to_id"], m["id"], reverse))
        ]
        return self._batch_response(results, [], ok=200)

    def _assoc_labeled(self, request: EmuRequest) -> EmuResponse:
        m = request.match
        obj, to = self.store.object_name(m["obj"]), self.store.object_name(m["to"])
        specs = request.json() or [{}]
        for spec in specs:
            self.store.associate(obj, m["id"], to, m["to_id"], spec.get("associationTypeId"))
        return EmuResponse(
            201,
            {
                "fromObjectTypeId": OBJECT_TYPE_IDS[obj],
                "fromObjectId": int(m["id"]),
                "toObjectTypeId": OBJECT_TYPE_IDS[to],
                "toObjectId": int(m["to_id"]),
                "labels": [],
            },
        )

    def _assoc_remove(self, request: EmuRequest) -> EmuResponse:
        m = request.match
        obj, to = self.store.object_name(m["obj"]), self.store.object_name(m["to"])
        self.store.dissociate(obj, m["id"], to, m["to_id"])
        return EmuResponse(204)

    def _assoc_list(self, request: EmuRequest) -> EmuResponse:
        m = request.match
        obj, to = self.store.object_name(m["obj"]), self.store.object_name(m["to"])
        self.store.record(obj, m["id"])
        limit = int_arg(request.arg("limit", "500"), "limit")
        start = int_arg(request.arg("after", "0") or "0", "after")
        rows = self.store.association_rows(obj, m["id"], to)
        out: dict[str, Any] = {"results": rows[start : start + limit]}
        if start + limit < len(rows):
            out["paging"] = {"next": {"after": str(start + limit)}}
        return EmuResponse(200, out)

    def _assoc_batch_read(self, request: EmuRequest) -> EmuResponse:
        m = request.match
        obj, to = self.store.object_name(m["obj"]), self.store.object_name(m["to"])
        inputs = (request.json() or {}).get("inputs") or []
        if len(inputs) > 1000:
            raise StoreError(400, "VALIDATION_ERROR", "A batch may hold at most 1000 inputs")
        results, errors = [], []
        for item in inputs:
            from_id = str(item.get("id"))
            rows = self.store.association_rows(obj, from_id, to) if self.store.find(obj, from_id) else []
            if rows:
                results.append({"from": {"id": from_id}, "to": rows})
            else:
                errors.append(
                    error_body(
                        "VALIDATION_ERROR",
                        f"No {to} is associated with {obj} {from_id}",
                        subCategory="crm.associations.NO_ASSOCIATIONS_FOUND",
                        context={"fromObjectId": [from_id]},
                    )
                )
        return self._batch_response(results, errors, ok=200)

"""A stateful loopback Dataverse Web API (v9.2) with an Entra ID token endpoint, for tests and demos.

Serves what the connector relies on: OData ``$select``/``$filter``/``$orderby``/``$top``,
``Prefer: odata.maxpagesize`` paging behind ``@odata.nextLink``, change tracking
(``Prefer: odata.track-changes``, ``@odata.deltaLink``, ``$deletedEntity`` entries, token
retention, the ExpiredVersionStamp error), alternate-key addressing, upsert semantics with
``If-Match``/``If-None-Match``, ETags, service-protection 429s with ``Retry-After`` from a
sliding window, and Dataverse error bodies. Behaviours the docs leave open are knobs.

Limits: the ``Date`` response header comes from the HTTP server (real time), not from the
emulator's settable clock; no ``$expand``, ``$batch``, ``$count`` or concurrency limit.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from connectors.dynamics.emulator_store import (
    BAD_REQUEST,
    DUPLICATE_RECORD,
    EXPIRED_VERSION_STAMP,
    INVALID_ARGUMENT,
    NOT_FOUND,
    REQUEST_LIMIT,
    VERSION_MISMATCH,
    DataverseFault,
    EmulatedStore,
    SortKey,
    TableSpec,
    compare_rows,
    decode_state,
    default_tables,
    encode_state,
    pack,
    unpack,
)
from connectors.dynamics.odata import (
    ODataSyntaxError,
    evaluate,
    fields_of,
    format_datetime,
    parse_filter,
    parse_orderby,
)
from connectors.emulator import EmulatorApp, EmuRequest, EmuResponse

API = "/api/data/v9.2"
MAX_PAGE_SIZE = 5000
_TOKEN_TIME = "%m/%d/%Y %H:%M:%S"


class DynamicsEmulator(EmulatorApp):
    """Dataverse Web API + Entra ID token endpoint over one stateful, thread-safe store.

    Knobs: ``clients`` (client id -> secret), ``token_lifetime`` seconds, ``delta_retention``
    (the org's ExpireChangeTrackingInDays), ``rate_limit`` requests per ``rate_window``
    seconds per app user (None: unlimited), ``max_page_size``.
    """

    def __init__(
        self,
        *,
        tables: Sequence[TableSpec] | None = None,
        tenant: str = "contoso-tenant",
        org_url: str = "https://contoso.crm.dynamics.com",
        clients: Mapping[str, str] | None = None,
        token_lifetime: int = 3599,
        delta_retention: timedelta = timedelta(days=7),
        rate_limit: int | None = None,
        rate_window: float = 300.0,
        max_page_size: int = MAX_PAGE_SIZE,
    ) -> None:
        super().__init__()
        self.tenant = tenant
        self.org_url = org_url
        self.clients = dict(clients if clients is not None else {"syncagent": "s3cret"})
        self.token_lifetime = token_lifetime
        self.delta_retention = delta_retention
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.max_page_size = max_page_size
        self.store = EmulatedStore(tables or default_tables(), self.now)
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._calls: dict[str, deque[datetime]] = {}
        self._register()

    # --- knobs -------------------------------------------------------------------------------
    def expire_all_tokens(self) -> None:
        """Make every issued access token expired (the next API call answers 401)."""
        with self._lock:
            past = self.now() - timedelta(seconds=1)
            self._tokens = {t: (client, past) for t, (client, _) in self._tokens.items()}

    def issue_token(self, client_id: str = "syncagent") -> str:
        """Mint an access token directly (skipping the token endpoint)."""
        with self._lock:
            token = secrets.token_urlsafe(24)
            self._tokens[token] = (client_id, self.now() + timedelta(seconds=self.token_lifetime))
            return token

    def set_change_tracking(self, entity_set: str, enabled: bool) -> None:
        """Turn change tracking on or off for a table (Dataverse cannot turn it off; tests can)."""
        with self._lock:
            self.store.set_change_tracking(entity_set, enabled)

    def set_key_status(self, entity_set: str, key_name: str, status: str) -> None:
        """Set an alternate key's index status (``Active``, ``Pending``, ``Failed``)."""
        with self._lock:
            self.store.key_status[(entity_set, key_name)] = status

    def version(self) -> int:
        """The database-wide row version most recently handed out."""
        with self._lock:
            return self.store.version

    # --- direct data access ------------------------------------------------------------------
    def insert(
        self,
        entity_set: str,
        fields: Mapping[str, Any],
        *,
        rid: str | None = None,
        modifiedon: datetime | None = None,
    ) -> str:
        """Create a row as if a user did, returning its id."""
        with self._lock:
            spec = self.store.spec(entity_set)
            return self.store.create(spec, self.store.values(spec, fields), rid, modifiedon)

    def update(
        self, entity_set: str, rid: str, fields: Mapping[str, Any], *, modifiedon: datetime | None = None
    ) -> None:
        """Change a row's columns as if a user did (bumps ``modifiedon`` and ``versionnumber``)."""
        with self._lock:
            spec = self.store.spec(entity_set)
            row = self.store.rows[entity_set].get(rid.lower())
            if row is None:
                raise KeyError(rid)
            self.store.touch(spec, row, self.store.values(spec, fields), modifiedon)

    def delete(self, entity_set: str, rid: str) -> None:
        """Delete a row as if a user did (change tracking reports it as removed)."""
        with self._lock:
            self.store.remove(self.store.spec(entity_set), rid.lower())

    def get(self, entity_set: str, rid: str) -> dict[str, Any] | None:
        """Return a copy of one row, or None."""
        with self._lock:
            row = self.store.rows[self.store.spec(entity_set).entity_set].get(rid.lower())
            return dict(row) if row is not None else None

    def all(self, entity_set: str) -> list[dict[str, Any]]:
        """Return copies of every row of a table, in primary-key order."""
        with self._lock:
            rows = self.store.rows[self.store.spec(entity_set).entity_set]
            return [dict(rows[k]) for k in sorted(rows)]

    def seed_demo(self) -> dict[str, list[str]]:
        """Fill the default tables with a small quote-to-cash data set; returns ids per table."""
        cities = [("Acme Consulting", "Berlin"), ("Globex", "Lyon"), ("Initech", "Austin")]
        accounts = [
            self.insert("accounts", {"name": name, "accountnumber": f"A-{n}", "erp_customerid": f"C-{n}",
                                     "address1_city": city})
            for n, (name, city) in enumerate(cities, 1)
        ]  # fmt: skip
        people = [("Ada", "Byron", "P-1", accounts[0]), ("Max", "Planck", "P-2", accounts[1])]
        contacts = [
            self.insert("contacts", {"firstname": first, "lastname": last, "erp_contactid": pid,
                                     "emailaddress1": f"{first.lower()}@example.com",
                                     "_parentcustomerid_value": account})
            for first, last, pid, account in people
        ]  # fmt: skip
        deals = [("Acme - Phase 2", "48000.00", 0, 1, 60, accounts[0]),
                 ("Globex rollout", "125000.50", 1, 3, 100, accounts[1])]  # fmt: skip
        opportunities = [
            self.insert("opportunities", {"name": name, "estimatedvalue": Decimal(value), "statecode": state,
                                          "statuscode": status, "closeprobability": chance,
                                          "_parentaccountid_value": account, "_customerid_value": account})
            for name, value, state, status, chance, account in deals
        ]  # fmt: skip
        return {"accounts": accounts, "contacts": contacts, "opportunities": opportunities}

    # --- HTTP plumbing -------------------------------------------------------------------------
    def _register(self) -> None:
        api = API.replace(".", r"\.")
        table = api + r"/(?P<set>[A-Za-z_]\w*)"
        definition = api + r"/EntityDefinitions\(LogicalName=(?P<name>[^)]*)\)"
        self.route("POST", r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", self._wrap(self._token, auth=False))
        self.route("GET", api + r"/WhoAmI", self._wrap(self._whoami))
        self.route("GET", definition, self._wrap(self._definition))
        self.route("GET", definition + "/Keys", self._wrap(self._keys))
        self.route("GET", table + r"\((?P<key>.*)\)", self._wrap(self._get_one))
        self.route("PATCH", table + r"\((?P<key>.*)\)", self._wrap(self._patch))
        self.route("DELETE", table + r"\((?P<key>.*)\)", self._wrap(self._delete))
        self.route("GET", table, self._wrap(self._query))
        self.route("POST", table, self._wrap(self._post))

    def not_found(self, request: EmuRequest) -> EmuResponse:
        """Answer an unknown path with a Dataverse error body."""
        segment = request.path.rstrip("/").rsplit("/", 1)[-1]
        fault = DataverseFault(404, BAD_REQUEST, f"Resource not found for the segment '{segment}'.")
        return EmuResponse(404, fault.body(), {"OData-Version": "4.0"})

    def _wrap(
        self, handler: Callable[[EmuRequest], EmuResponse], *, auth: bool = True
    ) -> Callable[[EmuRequest], EmuResponse]:
        def serve(request: EmuRequest) -> EmuResponse:
            try:
                if auth:
                    self._authorise(request)
                response = handler(request)
            except DataverseFault as fault:
                body = None if fault.status == 401 else fault.body()
                response = EmuResponse(fault.status, body, fault.headers)
            return EmuResponse(response.status, response.body, {"OData-Version": "4.0", **response.headers})

        return serve

    def _authorise(self, request: EmuRequest) -> None:
        header = request.header("authorization") or ""
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        grant = self._tokens.get(token)
        if grant is None or grant[1] <= self.now():
            challenge = (
                f"Bearer authorization_uri=https://login.microsoftonline.com/{self.tenant}"
                f"/oauth2/authorize, resource_id={self.org_url}/"
            )
            raise DataverseFault(401, "", "", {"WWW-Authenticate": challenge})
        if self.rate_limit is not None:
            self._throttle(grant[0])

    def _throttle(self, user: str) -> None:
        assert self.rate_limit is not None
        now = self.now()
        window = timedelta(seconds=self.rate_window)
        calls = self._calls.setdefault(user, deque())
        while calls and calls[0] <= now - window:
            calls.popleft()
        if len(calls) >= self.rate_limit:
            wait = max(1, math.ceil((calls[0] + window - now).total_seconds()))
            message = (
                f"Number of requests exceeded the limit of {self.rate_limit} over time window of "
                f"{int(self.rate_window)} seconds."
            )
            raise DataverseFault(429, REQUEST_LIMIT, message, {"Retry-After": str(wait)})
        calls.append(now)

    def _base(self, request: EmuRequest) -> str:
        return f"http://{request.header('host') or 'localhost'}{API}"

    # --- auth and metadata ---------------------------------------------------------------------
    def _token(self, request: EmuRequest) -> EmuResponse:
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}

        def refuse(status: int, error: str, aadsts: str, text: str) -> EmuResponse:
            body = {
                "error": error,
                "error_description": f"{aadsts}: {text}",
                "error_codes": [int(aadsts[6:])],
                "trace_id": str(uuid.uuid4()),
                "correlation_id": str(uuid.uuid4()),
            }
            return EmuResponse(status, body)

        if request.match["tenant"] != self.tenant:
            return refuse(400, "invalid_request", "AADSTS90002", "Tenant not found.")
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", "AADSTS70003", "The grant type is not supported.")
        client_id = form.get("client_id", "")
        expected = self.clients.get(client_id)
        if expected is None or not secrets.compare_digest(expected, form.get("client_secret", "")):
            return refuse(401, "invalid_client", "AADSTS7000215", "Invalid client secret provided.")
        if not form.get("scope", "").endswith("/.default"):
            return refuse(400, "invalid_scope", "AADSTS70011", "The provided scope is not valid.")
        token = self.issue_token(client_id)
        life = self.token_lifetime
        body = {"token_type": "Bearer", "expires_in": life, "ext_expires_in": life, "access_token": token}
        return EmuResponse(200, body)

    def _whoami(self, request: EmuRequest) -> EmuResponse:
        return EmuResponse(200, {
            "@odata.context": f"{self._base(request)}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": "5a1f0c6e-0000-4000-8000-000000000001",
            "UserId": "5a1f0c6e-0000-4000-8000-000000000002",
            "OrganizationId": "5a1f0c6e-0000-4000-8000-000000000003",
        })  # fmt: skip

    def _definition(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.by_logical_name(unquote(request.match["name"]).strip("'"))
        return EmuResponse(200, {
            "@odata.context": f"{self._base(request)}/$metadata#EntityDefinitions/$entity",
            "LogicalName": spec.logical_name,
            "EntitySetName": spec.entity_set,
            "PrimaryIdAttribute": spec.primary_key,
            "ChangeTrackingEnabled": spec.change_tracking,
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, spec.logical_name)),
        })  # fmt: skip

    def _keys(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.by_logical_name(unquote(request.match["name"]).strip("'"))
        keys = [
            {"LogicalName": name, "KeyAttributes": list(columns),
             "EntityKeyIndexStatus": self.store.key_status.get((spec.entity_set, name), "Active")}
            for name, columns in spec.alternate_keys.items()
        ]  # fmt: skip
        return EmuResponse(200, {"value": keys})

    # --- reads ---------------------------------------------------------------------------------
    def _select(self, spec: TableSpec, request: EmuRequest) -> list[str] | None:
        raw = request.arg("$select")
        if not raw:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        _known(spec, names)
        return names

    def _render(
        self, spec: TableSpec, row: Mapping[str, Any], select: Sequence[str] | None
    ) -> dict[str, Any]:
        names = list(select) if select else sorted(spec.readable)
        if spec.primary_key not in names:
            names.append(spec.primary_key)  # Dataverse always returns the primary key
        out: dict[str, Any] = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
        for name in names:
            value = row.get(name)
            out[name] = format_datetime(value) if isinstance(value, datetime) else value
        return out

    def _get_one(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.spec(request.match["set"])
        select = self._select(spec, request)
        row, key = self.store.find(spec, request.match["key"])
        if row is None:
            raise DataverseFault(
                404, NOT_FOUND, f"{spec.logical_name} With Id = {_key_text(key)} Does Not Exist"
            )
        body = {"@odata.context": f"{self._base(request)}/$metadata#{spec.entity_set}/$entity"}
        body.update(self._render(spec, row, select))
        return EmuResponse(200, body)

    def _link(self, request: EmuRequest, spec: TableSpec, extra: Mapping[str, str]) -> str:
        params = {k: request.arg(k) or "" for k in ("$select", "$filter", "$orderby") if request.arg(k)}
        params.update(extra)
        query = "&".join(f"{k}={quote(v, safe=',')}" for k, v in params.items())
        return f"{self._base(request)}/{spec.entity_set}?{query}"

    def _context(self, request: EmuRequest, spec: TableSpec, select: Sequence[str] | None) -> str:
        columns = f"({','.join(select)})" if select else ""
        return f"{self._base(request)}/$metadata#{spec.entity_set}{columns}"

    def _query(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.spec(request.match["set"])
        prefer = _prefer(request.header("prefer"))
        select = self._select(spec, request)
        page_size = self.max_page_size
        applied: list[str] = []
        if "odata.maxpagesize" in prefer:
            try:  # a larger value than the maximum is ignored, not an error
                page_size = max(1, min(int(prefer["odata.maxpagesize"]), self.max_page_size))
            except ValueError:
                pass
            applied.append(f"odata.maxpagesize={page_size}")
        if "odata.track-changes" in prefer or request.arg("$deltatoken") is not None:
            for option in ("$filter", "$orderby", "$expand", "$top"):
                if request.arg(option) is not None:
                    message = (
                        f'The "{option}" query parameter isn\'t supported when Change Tracking is enabled.'
                    )
                    raise DataverseFault(400, BAD_REQUEST, message)
            if not spec.change_tracking:
                message = f"Change tracking is not enabled for the entity '{spec.logical_name}'."
                raise DataverseFault(400, INVALID_ARGUMENT, message)
            applied.insert(0, "odata.track-changes")
            token = request.arg("$deltatoken")
            if token is None:
                body = self._initial_walk(request, spec, select, page_size)
            else:
                body = self._delta_walk(request, spec, select, page_size, token)
        else:
            body = self._rows_page(request, spec, select, page_size)
        return EmuResponse(200, body, {"Preference-Applied": ",".join(applied)} if applied else {})

    def _rows_page(
        self, request: EmuRequest, spec: TableSpec, select: list[str] | None, page_size: int
    ) -> dict[str, Any]:
        try:
            where = parse_filter(request.arg("$filter") or "") if request.arg("$filter") else None
            order = parse_orderby(request.arg("$orderby") or spec.primary_key)
        except ODataSyntaxError as exc:
            raise DataverseFault(400, BAD_REQUEST, f"Syntax error in the query: {exc}") from exc
        _known(spec, [name for name, _ in order] + sorted(fields_of(where) if where else ()))
        if spec.primary_key not in [name for name, _ in order]:
            order.append((spec.primary_key, False))  # a total order, so the paging cookie is exact
        names = [name for name, _ in order]
        descending = [desc for _, desc in order]
        rows = [r for r in self.store.rows[spec.entity_set].values() if where is None or evaluate(where, r)]
        rows.sort(key=lambda r: SortKey([r.get(n) for n in names], descending))
        body: dict[str, Any] = {"@odata.context": self._context(request, spec, select)}
        top = request.arg("$top")
        if top is not None:  # $top caps the total and never pages
            body["value"] = [self._render(spec, r, select) for r in rows[: max(0, int(top))]]
            return body
        skip = request.arg("$skiptoken")
        if skip:
            after = [unpack(v) for v in decode_state(skip).get("after", [])]
            rows = [r for r in rows if compare_rows([r.get(n) for n in names], after, descending) > 0]
        page = rows[:page_size]
        body["value"] = [self._render(spec, r, select) for r in page]
        if len(rows) > page_size:
            cookie = encode_state({"after": [pack(page[-1].get(n)) for n in names]})
            body["@odata.nextLink"] = self._link(request, spec, {"$skiptoken": cookie})
        return body

    def _initial_walk(
        self, request: EmuRequest, spec: TableSpec, select: list[str] | None, page_size: int
    ) -> dict[str, Any]:
        # Every row in key order; the delta token on the last page dates from the first page,
        # so changes made during a long walk come again in the next delta (never lost).
        state = decode_state(request.arg("$skiptoken") or "") if request.arg("$skiptoken") else {}
        v0 = int(state.get("v0", self.store.version))
        t0 = str(state.get("t0") or self.now().strftime(_TOKEN_TIME))
        after = state.get("after")
        rows = sorted(
            (r for k, r in self.store.rows[spec.entity_set].items() if after is None or k > after),
            key=lambda r: str(r[spec.primary_key]),
        )
        page = rows[:page_size]
        body: dict[str, Any] = {
            "@odata.context": self._context(request, spec, select),
            "value": [self._render(spec, r, select) for r in page],
        }
        if len(rows) > page_size:
            cookie = encode_state({"v0": v0, "t0": t0, "after": page[-1][spec.primary_key]})
            body["@odata.nextLink"] = self._link(request, spec, {"$skiptoken": cookie})
        else:
            body["@odata.deltaLink"] = self._link(request, spec, {"$deltatoken": f"{v0}!{t0}"})
        return body

    def _check_token(self, token: str) -> int:
        expired = DataverseFault(
            400,
            EXPIRED_VERSION_STAMP,
            "Version stamp associated with the client has expired. Please perform a full sync.",
        )
        version_text, _, stamp = token.partition("!")
        try:
            version = int(version_text)
            issued = datetime.strptime(stamp, _TOKEN_TIME).replace(tzinfo=self.now().tzinfo)
        except ValueError as exc:
            raise expired from exc
        if version > self.store.version or self.now() - issued > self.delta_retention:
            raise expired
        return version

    def _delta_walk(
        self, request: EmuRequest, spec: TableSpec, select: list[str] | None, page_size: int, token: str
    ) -> dict[str, Any]:
        since = self._check_token(token)
        state = decode_state(request.arg("$skiptoken") or "") if request.arg("$skiptoken") else {}
        upto = int(state.get("upto", self.store.version))
        at = str(state.get("at") or self.now().strftime(_TOKEN_TIME))
        position = (int(state.get("phase", -1)), int(state.get("last", since)))
        entries = [e for e in self.store.changes(spec, since, upto) if (e[0], e[1]) > position]
        page = entries[:page_size]
        removed = f"{self._base(request)}/$metadata#{spec.entity_set}/$deletedEntity"
        values = [
            self._render(spec, self.store.rows[spec.entity_set][rid], select)
            if phase == 0
            else {"@odata.context": removed, "id": rid, "reason": "deleted"}
            for phase, _, rid in page
        ]
        body = {"@odata.context": self._context(request, spec, select) + "/$delta", "value": values}
        if len(entries) > page_size:
            cookie = encode_state({"upto": upto, "at": at, "phase": page[-1][0], "last": page[-1][1]})
            body["@odata.nextLink"] = self._link(request, spec, {"$deltatoken": token, "$skiptoken": cookie})
        else:
            body["@odata.deltaLink"] = self._link(request, spec, {"$deltatoken": f"{upto}!{at}"})
        return body

    # --- writes --------------------------------------------------------------------------------
    def _representation(self, request: EmuRequest, spec: TableSpec, rid: str, status: int) -> EmuResponse:
        row = self.store.rows[spec.entity_set][rid]
        headers = {"OData-EntityId": f"{self._base(request)}/{spec.entity_set}({rid})",
                   "ETag": f'W/"{row["versionnumber"]}"'}  # fmt: skip
        if _prefer(request.header("prefer")).get("return") == "representation":
            body = {"@odata.context": f"{self._base(request)}/$metadata#{spec.entity_set}/$entity"}
            body.update(self._render(spec, row, self._select(spec, request)))
            return EmuResponse(status, body, {**headers, "Preference-Applied": "return=representation"})
        return EmuResponse(204, None, headers)

    def _body(self, request: EmuRequest) -> Mapping[str, Any]:
        try:
            body = request.json()
        except ValueError as exc:
            raise DataverseFault(400, BAD_REQUEST, "The request body is not valid JSON.") from exc
        if not isinstance(body, dict):
            raise DataverseFault(400, BAD_REQUEST, "The request body must be a JSON object.")
        return body

    def _post(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.spec(request.match["set"])
        body = self._body(request)
        given = body.get(spec.primary_key)
        rid = self.store.create(spec, self.store.values(spec, body), str(given) if given else None)
        return self._representation(request, spec, rid, 201)

    def _patch(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.spec(request.match["set"])
        row, key = self.store.find(spec, request.match["key"])
        values = self.store.values(spec, self._body(request))
        if_match = request.header("if-match")
        if row is None:  # PATCH is an upsert unless If-Match says "only if it exists"
            if if_match:
                raise DataverseFault(
                    404, NOT_FOUND, f"{spec.logical_name} With Id = {_key_text(key)} Does Not Exist"
                )
            values.update({c: v for c, v in key.items() if c != spec.primary_key})
            rid = self.store.create(spec, values, key.get(spec.primary_key))
            return self._representation(request, spec, rid, 201)
        if request.header("if-none-match") == "*":
            raise DataverseFault(412, DUPLICATE_RECORD, "A record with matching key values already exists.")
        if if_match and if_match != "*" and if_match != f'W/"{row["versionnumber"]}"':
            message = "The version of the existing record doesn't match the RowVersion property provided."
            raise DataverseFault(412, VERSION_MISMATCH, message)
        if spec.primary_key not in key:
            for column in key:
                values.pop(column, None)  # key columns in the body are ignored on update
        self.store.touch(spec, row, values)
        return self._representation(request, spec, row[spec.primary_key], 200)

    def _delete(self, request: EmuRequest) -> EmuResponse:
        spec = self.store.spec(request.match["set"])
        row, key = self.store.find(spec, request.match["key"])
        if row is None:
            raise DataverseFault(
                404, NOT_FOUND, f"{spec.logical_name} With Id = {_key_text(key)} Does Not Exist"
            )
        self.store.remove(spec, row[spec.primary_key])
        return EmuResponse(204)


def _key_text(key: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in key.items()) if len(key) > 1 else str(next(iter(key.values())))


def _known(spec: TableSpec, names: Sequence[str]) -> None:
    for name in names:
        if name not in spec.readable:
            entity = f"Microsoft.Dynamics.CRM.{spec.logical_name}"
            message = f"Could not find a property named '{name}' on type '{entity}'."
            raise DataverseFault(400, BAD_REQUEST, message)


def _prefer(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name:
            out[name.strip().lower()] = value.strip().strip('"')
    return out

"""A stateful loopback NetSuite: M2M token endpoint, SuiteQL over REST and the record service.

Usage::

    from connectors.emulator import EmulatorServer
    from connectors.netsuite.emulator import NetSuiteEmulator, ns_error

    emu = NetSuiteEmulator(assertion_secret="s3cret", query_cap=5_000)
    emu.seed_demo()
    with EmulatorServer(emu) as server:
        ...                                      # point an httpx client at server.url
    emu.inject(ns_error(429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded."))

Behaviour follows ``shared/reference/api-contracts.md`` section 4 and its fidelity checklist:
SuiteQL needs ``Prefer: transient``, pages with ``limit`` (<= 1000) and ``offset`` (a multiple
of ``limit``), leaves nulls out of items, answers past ``query_cap`` rows with an error, and
renders a date column without ``TO_CHAR`` in the user's display format and zone. Writes answer
204 with a ``Location``; errors use the ``o:errorDetails`` body. A concurrency limit across
requests answers 429 without Retry-After. The JWT client assertion is verified (``alg``,
``kid``, ``iss``, ``aud``, ``scope``, ``exp`` <= ``iat`` + 1 h); this emulator checks HS256
signatures with ``assertion_secret`` unless given a ``verifier`` (real NetSuite wants PS256/ES256).

Emulator shorthands, not NetSuite facts: the ``deletedrecord`` table's columns (``recordid``,
``type``, ``deleteddate``, ``externalid``) are a guess [unverified], and a payment's applied
invoice shows in SuiteQL as the column ``appliedinvoice`` (NetSuite keeps it in transaction links).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, unquote

from connectors.emulator import EmulatorApp, EmuRequest, EmuResponse
from connectors.netsuite import _suiteql
from connectors.netsuite._store import RecordStore, Rejected

TOKEN_PATH = "/services/rest/auth/oauth2/v1/token"
SUITEQL_PATH = "/services/rest/query/v1/suiteql"
RECORD_PATH = "/services/rest/record/v1"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

Verifier = Callable[[str, bytes, bytes], bool]

_TITLES = {
    400: ("Bad Request", "15.5.1"),
    401: ("Unauthorized", "15.5.2"),
    403: ("Forbidden", "15.5.4"),
    404: ("Not Found", "15.5.5"),
    405: ("Method Not Allowed", "15.5.6"),
    429: ("Too Many Requests", "rfc6585.html#section-4"),
    500: ("Internal Server Error", "15.6.1"),
    503: ("Service Unavailable", "15.6.4"),
}
_LOGIN_DETAIL = (
    "Invalid login attempt. For more details, see the Login Audit Trail in the NetSuite UI "
    "at Setup > Users/Roles > User Management > View Login Audit Trail."
)


def ns_error(status: int, code: str, detail: str, path: str | None = None) -> EmuResponse:
    """Build a NetSuite REST error response (``type``, ``title``, ``status``, ``o:errorDetails``)."""
    title, section = _TITLES.get(status, ("Error", "15"))
    item: dict[str, Any] = {"detail": detail, "o:errorCode": code}
    if path is not None:
        item["o:errorPath"] = path
    body = {
        "type": "https://www.rfc-editor.org/rfc/"
        + (section if section.startswith("rfc") else f"rfc9110.html#section-{section}"),
        "title": title,
        "status": status,
        "o:errorDetails": [item],
    }
    headers = {"WWW-Authenticate": 'Bearer error="token_rejected"'} if status == 401 else {}
    return EmuResponse(status, body, headers)


def hs256_verifier(secret: str) -> Verifier:
    """Return a verifier accepting HS256 signatures made with ``secret`` (tests, sandbox)."""

    def verify(alg: str, signing_input: bytes, signature: bytes) -> bool:
        expected = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
        return alg == "HS256" and hmac.compare_digest(expected, signature)

    return verify


class NetSuiteEmulator(EmulatorApp):
    """Stateful NetSuite REST + SuiteQL emulator with M2M auth, limits and injectable faults."""

    def __init__(
        self,
        *,
        client_id: str = "syncagent-client",
        certificate_id: str = "syncagent-cert",
        assertion_secret: str = "emulator-secret",
        verifier: Verifier | None = None,
        algorithms: tuple[str, ...] = ("HS256",),
        token_lifetime: timedelta = timedelta(hours=1),
        concurrency_limit: int = 5,
        query_cap: int = 100_000,
        max_page: int = 1000,
        max_pages: int = 1000,
        require_transient: bool = True,
        sql_zone: tzinfo = UTC,
        display_zone: tzinfo | None = None,
        display_datetime: str = "%m/%d/%Y %I:%M %p",
        display_date: str = "%m/%d/%Y",
    ) -> None:
        super().__init__()
        self.client_id = client_id
        self.certificate_id = certificate_id
        self.algorithms = algorithms
        self.token_lifetime = token_lifetime
        self.concurrency_limit = concurrency_limit
        self.query_cap = query_cap
        self.max_page = max_page
        self.max_pages = max_pages
        self.require_transient = require_transient
        self.session = _suiteql.Session(
            sql_zone, display_zone or _default_display_zone(), display_datetime, display_date
        )
        self._verify = verifier or hs256_verifier(assertion_secret)
        self._store = RecordStore(self.now)
        self._tokens: dict[str, datetime] = {}
        self._grants: list[dict[str, Any]] = []
        self._refusals: list[str] = []
        self._gate = threading.Lock()
        self.in_flight = 0
        self.route("POST", TOKEN_PATH, self._token)
        self.route("POST", SUITEQL_PATH, _guarded(self._suiteql))
        self.route("GET", RECORD_PATH + r"/(?P<type>\w+)", _guarded(self._list))
        self.route("POST", RECORD_PATH + r"/(?P<type>\w+)", _guarded(self._create))
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            self.route(method, RECORD_PATH + r"/(?P<type>\w+)/(?P<ref>[^/]+)", _guarded(self._record_route))

    # --- request plumbing ----------------------------------------------------------
    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Serve one request, answering 429 when too many are already in flight."""
        if request.path == TOKEN_PATH:
            return super().handle(request)
        with self._gate:
            over = 0 < self.concurrency_limit <= self.in_flight
            if not over:
                self.in_flight += 1
        if over:
            response = ns_error(
                429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded. Request blocked."
            )
            self._record(request, response.status)
            return response
        try:
            return super().handle(request)
        finally:
            with self._gate:
                self.in_flight -= 1

    def not_found(self, request: EmuRequest) -> EmuResponse:
        """Answer an unknown path the NetSuite way."""
        return ns_error(404, "NONEXISTENT_ID", f"The requested resource {request.path} does not exist.")

    def _authorized(self, request: EmuRequest) -> None:
        header = request.header("authorization") or ""
        token = header[7:] if header.lower().startswith("bearer ") else ""
        expires = self._tokens.get(token)
        if expires is None or expires <= self.now():
            raise Rejected(401, "INVALID_LOGIN", _LOGIN_DETAIL)

    # --- token endpoint ------------------------------------------------------------
    def _token(self, request: EmuRequest) -> EmuResponse:
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return self._refuse("unsupported_grant_type", "grant_type")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            return self._refuse("invalid_request", "client_assertion_type")
        url = f"http://{request.header('host', '')}{request.path}"
        problem = self._check_assertion(form["client_assertion"], url)
        if problem:
            return self._refuse("invalid_client", problem)
        token = secrets.token_hex(16)
        self._tokens[token] = self.now() + self.token_lifetime
        seconds = int(self.token_lifetime.total_seconds())
        return EmuResponse(200, {"access_token": token, "expires_in": str(seconds), "token_type": "bearer"})

    def _refuse(self, error: str, reason: str) -> EmuResponse:
        self._refusals.append(reason)
        return EmuResponse(400, {"error": error})

    def _check_assertion(self, assertion: str, token_url: str) -> str | None:
        parts = assertion.split(".")
        if len(parts) != 3:
            return "malformed"
        try:
            header, claims = json.loads(_b64d(parts[0])), json.loads(_b64d(parts[1]))
            signature = _b64d(parts[2])
        except ValueError:
            return "malformed"
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "malformed"
        if header.get("alg") not in self.algorithms:
            return "alg"
        if header.get("kid") != self.certificate_id:
            return "kid"
        if not self._verify(str(header["alg"]), f"{parts[0]}.{parts[1]}".encode(), signature):
            return "signature"
        if claims.get("iss") != self.client_id:
            return "iss"
        aud = claims.get("aud")
        if aud != token_url and not (isinstance(aud, list) and token_url in aud):
            return "aud"
        scope = claims.get("scope")
        scopes = scope.split() if isinstance(scope, str) else scope if isinstance(scope, list) else []
        if "rest_webservices" not in scopes:
            return "scope"
        iat, exp, now = claims.get("iat"), claims.get("exp"), self.now().timestamp()
        if not isinstance(iat, int) or not isinstance(exp, int):
            return "iat/exp"
        if exp - iat > 3600 or exp <= now or iat > now + 60:
            return "exp"
        self._grants.append({"header": header, "claims": claims})
        return None

    def grants(self) -> list[dict[str, Any]]:
        """Return the verified assertions (header and claims), oldest first."""
        with self._lock:
            return [dict(g) for g in self._grants]

    def refusals(self) -> list[str]:
        """Return why token requests were refused (NetSuite itself never says)."""
        with self._lock:
            return list(self._refusals)

    def expire_tokens(self) -> None:
        """Make every issued access token invalid, as if its hour had passed."""
        with self._lock:
            self._tokens.clear()

    # --- SuiteQL -------------------------------------------------------------------
    def _suiteql(self, request: EmuRequest) -> EmuResponse:
        self._authorized(request)
        if self.require_transient and (request.header("prefer") or "").lower() != "transient":
            return ns_error(400, "INVALID_PARAMETER", "The request header Prefer: transient is required.")
        limit, offset = self._paging(request)
        body = _body(request)
        text = body.get("q") if isinstance(body, dict) else None
        if not isinstance(text, str):
            return ns_error(400, "INVALID_CONTENT", "The request body must contain the query in 'q'.")
        try:
            query = _suiteql.parse(text)
            rows, columns = self._store.table(query.table)
            items = _suiteql.run(query, rows, self.session, columns)
        except _suiteql.SuiteQLError as exc:
            return ns_error(400, "INVALID_PARAMETER", str(exc))
        cap = min(self.query_cap, self.max_pages * limit)
        if offset >= cap:
            return ns_error(
                400,
                "INVALID_PARAMETER",
                f"The query returns more than the maximum of {cap} results; narrow it.",
                None,
            )
        total = len(items)
        page = items[offset : min(offset + limit, cap)]
        has_more = offset + len(page) < total
        base = f"http://{request.header('host', '')}{request.path}"
        links = [{"rel": "self", "href": f"{base}?limit={limit}&offset={offset}"}]
        if has_more:
            links.insert(0, {"rel": "next", "href": f"{base}?limit={limit}&offset={offset + limit}"})
        if offset:
            links.append({"rel": "previous", "href": f"{base}?limit={limit}&offset={max(0, offset - limit)}"})
        return EmuResponse(
            200,
            {
                "links": links,
                "count": len(page),
                "hasMore": has_more,
                "items": page,
                "offset": offset,
                "totalResults": total,
            },
        )

    def _paging(self, request: EmuRequest) -> tuple[int, int]:
        try:
            limit = int(request.arg("limit") or self.max_page)
            offset = int(request.arg("offset") or 0)
        except ValueError as exc:
            raise Rejected(400, "INVALID_PARAMETER", "limit and offset must be integers.") from exc
        if not 1 <= limit <= self.max_page:
            raise Rejected(400, "INVALID_PARAMETER", f"limit must be between 1 and {self.max_page}.")
        if offset < 0 or offset % limit:
            raise Rejected(400, "INVALID_PARAMETER", "offset must be a multiple of limit.")
        return limit, offset

    # --- record service ------------------------------------------------------------
    def _record_route(self, request: EmuRequest) -> EmuResponse:
        self._authorized(request)
        rtype = self._store.record_type(request.match["type"])
        ref = unquote(request.match["ref"])
        rid = self._store.find(rtype, ref)
        if request.method == "PUT":
            if not ref.startswith("eid:"):
                return ns_error(405, "METHOD_NOT_ALLOWED", "PUT is allowed only with an external ID.")
            fields = self._fields(rtype, request)
            fields["externalid"] = ref[4:]
            return self._located(request, rtype, self._store.save(rtype, rid, fields))
        if rid is None:
            return ns_error(404, "NONEXISTENT_ID", f"The record instance {ref} does not exist.")
        if request.method == "GET":
            href = f"http://{request.header('host', '')}{RECORD_PATH}/{rtype}/{rid}"
            return EmuResponse(200, self._store.rest_body(rtype, rid, href))
        if request.method == "DELETE":
            self._store.delete(rtype, str(rid))
            return EmuResponse(204)
        self._store.save(rtype, rid, self._fields(rtype, request))
        return EmuResponse(204)

    def _create(self, request: EmuRequest) -> EmuResponse:
        self._authorized(request)
        rtype = self._store.record_type(request.match["type"])
        fields = self._fields(rtype, request)
        eid = fields.get("externalid")
        if eid is not None and self._store.find(rtype, f"eid:{eid}") is not None:
            return ns_error(400, "USER_ERROR", "A record with this external ID already exists.", "externalId")
        return self._located(request, rtype, self._store.save(rtype, None, fields))

    def _list(self, request: EmuRequest) -> EmuResponse:
        self._authorized(request)
        rtype = self._store.record_type(request.match["type"])
        limit, offset = self._paging(request)
        ids = self._store.ids(rtype)
        page = ids[offset : offset + limit]
        base = f"http://{request.header('host', '')}{RECORD_PATH}/{rtype}"
        items = [{"links": [{"rel": "self", "href": f"{base}/{i}"}], "id": str(i)} for i in page]
        more = offset + len(page) < len(ids)
        body = {
            "links": [],
            "count": len(items),
            "hasMore": more,
            "items": items,
            "offset": offset,
            "totalResults": len(ids),
        }
        return EmuResponse(200, body)

    def _fields(self, rtype: str, request: EmuRequest) -> dict[str, Any]:
        strict = (request.header("x-netsuite-propertynamevalidation") or "").lower() == "error"
        return self._store.fields_from_body(rtype, _body(request), strict=strict)

    def _located(self, request: EmuRequest, rtype: str, rid: int) -> EmuResponse:
        location = f"http://{request.header('host', '')}{RECORD_PATH}/{rtype}/{rid}"
        return EmuResponse(204, None, {"Location": location})

    # --- configuration and direct data access ----------------------------------------
    def define_record(self, rtype: str, fields: Mapping[str, str]) -> None:
        """Add a custom record type (``customrecord_*``): a ``name`` plus ``fields`` (column -> kind).

        Kinds are ``text``, ``number``, ``date``, ``bool`` and ``ref``; ``ref:customer,job``
        also checks that the referenced record exists, as a select field does.
        """
        with self._lock:
            self._store.define(rtype, fields)

    def add_fields(self, rtype: str, fields: Mapping[str, str]) -> None:
        """Add custom fields (``custentity_*``...; column -> kind, as ``define_record``) to a record type."""
        with self._lock:
            self._store.add_fields(rtype, fields)

    def require(self, rtype: str, column: str) -> None:
        """Make ``column`` mandatory on ``rtype`` writes (400 USER_ERROR naming it)."""
        with self._lock:
            self._store.require(rtype, column)

    def allow(self, rtype: str, column: str, values: tuple[str, ...]) -> None:
        """Accept only ``values`` for ``column`` on ``rtype`` writes (400 USER_ERROR naming it)."""
        with self._lock:
            self._store.allow(rtype, column, values)

    def insert(self, rtype: str, fields: Mapping[str, Any], *, modified: datetime | None = None) -> str:
        """Create a record from SuiteQL column values, unvalidated; returns its internal id."""
        with self._lock:
            return self._store.insert(rtype, fields, modified=modified)

    def update(
        self, rtype: str, rid: str, fields: Mapping[str, Any], *, modified: datetime | None = None
    ) -> None:
        """Change column values of a record and bump its ``lastmodifieddate``."""
        with self._lock:
            self._store.update(rtype, rid, fields, modified=modified)

    def delete(self, rtype: str, rid: str, *, at: datetime | None = None) -> None:
        """Delete a record and log it in the ``deletedrecord`` table."""
        with self._lock:
            self._store.delete(rtype, rid, at=at)

    def get(self, rtype: str, rid: str) -> dict[str, Any] | None:
        """Return a copy of a record's columns, or None."""
        with self._lock:
            return self._store.get(rtype, rid)

    def all(self, rtype: str) -> list[dict[str, Any]]:
        """Return copies of every record of ``rtype``, by internal id."""
        with self._lock:
            return self._store.all(rtype)

    def seed_demo(self) -> None:
        """Load a small quote-to-cash data set: two customers, a project, an invoice, a payment."""
        acme = self.insert(
            "customer",
            {
                "entityid": "C-10042",
                "companyname": "Acme Consulting GmbH",
                "subsidiary": "1",
                "currency": "2",
                "externalid": "C-10042",
            },
        )
        self.insert(
            "customer",
            {
                "entityid": "C-10043",
                "companyname": "Globex Ltd",
                "subsidiary": "1",
                "currency": "1",
                "externalid": "C-10043",
            },
        )
        job = self.insert(
            "job",
            {
                "entityid": "P-2001",
                "companyname": "Acme ERP rollout",
                "parent": acme,
                "jobtype": "1",
                "entitystatus": "2",
                "percentcomplete": Decimal("40"),
                "externalid": "P-2001",
            },
        )
        inv = self.insert(
            "invoice",
            {
                "entity": job,
                "tranid": "INV-1042",
                "trandate": date(2024, 5, 1),
                "foreigntotal": Decimal("48000.00"),
                "status": "A",
                "currency": "2",
                "externalid": "INV-1042",
            },
        )
        self.insert(
            "customerpayment",
            {
                "entity": acme,
                "tranid": "PYMT-77",
                "trandate": date(2024, 5, 20),
                "foreigntotal": Decimal("48000.00"),
                "appliedinvoice": inv,
                "currency": "2",
                "externalid": "PYMT-77",
            },
        )


def _guarded(handler: Callable[[EmuRequest], EmuResponse]) -> Callable[[EmuRequest], EmuResponse]:
    def serve(request: EmuRequest) -> EmuResponse:
        try:
            return handler(request)
        except Rejected as exc:
            return ns_error(exc.status, exc.code, exc.detail, exc.path)

    return serve


def _body(request: EmuRequest) -> Any:
    try:
        return request.json()
    except ValueError as exc:
        raise Rejected(400, "INVALID_CONTENT", "The request body is not valid JSON.") from exc


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _default_display_zone() -> tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        return ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:
        return UTC

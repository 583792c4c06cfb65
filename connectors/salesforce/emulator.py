"""A stateful loopback Salesforce REST emulator: OAuth, SOQL queries, describe, sObject Collections.

It follows ``shared/reference/api-contracts.md`` §1 and §7: error bodies are JSON arrays of
``{message, errorCode, fields}`` (OAuth errors are ``{error, error_description}`` objects),
datetimes are rendered ``YYYY-MM-DDTHH:MM:SS.000+0000`` with whole seconds (so many rows
share a ``SystemModstamp``), deletes are soft (``IsDeleted``, visible to ``queryAll`` only),
query pages are behind host-relative ``nextRecordsUrl`` links (which say ``/query/`` even for
``queryAll``), every API response carries ``Sforce-Limit-Info`` and a ``Date`` from the
emulator clock, and the daily limit answers 403 ``REQUEST_LIMIT_EXCEEDED`` without
``Retry-After``. Tests drive it with direct data access and fault helpers.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs

from connectors.emulator import EmulatorApp, EmuRequest, EmuResponse
from connectors.salesforce.schema import (
    STAGES,
    RowFailure,
    SfField,
    SfSchema,
    check_write,
    default_schemas,
)
from connectors.salesforce.soql import SoqlError, evaluate, parse_soql, validate

__all__ = ["SalesforceEmulator", "SfField", "SfSchema", "default_schemas"]

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_API = r"/services/data/v(?P<v>\d+\.\d)"


class _SfError(Exception):
    """A whole-request failure, rendered as Salesforce's JSON error array."""

    def __init__(self, status: int, code: str, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, list(fields)

    def response(self) -> EmuResponse:
        body = [{"message": self.message, "errorCode": self.code, "fields": self.fields}]
        return EmuResponse(self.status, body)


class SalesforceEmulator(EmulatorApp):
    """Stateful, thread-safe Salesforce REST emulator with knobs and fault helpers."""

    def __init__(
        self,
        *,
        page_size: int = 2000,
        token_lifetime: timedelta = timedelta(hours=2),
        daily_limit: int = 100_000,
        api_versions: Sequence[str] = ("58.0", "59.0", "60.0", "61.0", "62.0"),
        clients: Mapping[str, str] | None = None,
        jwt_keys: Mapping[str, str] | None = None,
        jwt_audience: str = "https://login.salesforce.com",
        schemas: Mapping[str, SfSchema] | None = None,
    ) -> None:
        super().__init__()
        self.page_size = page_size
        self.token_lifetime = token_lifetime
        self.daily_limit = daily_limit
        self.api_versions = tuple(api_versions)
        self.clients = dict(clients if clients is not None else {"syncagent": "s3cret"})
        self.jwt_keys = dict(jwt_keys if jwt_keys is not None else {"syncagent": "jwt-key"})
        self.jwt_audience = jwt_audience
        self.schemas = dict(schemas if schemas is not None else default_schemas())
        self.api_used = 0
        self.tokens_issued = 0
        self._records: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in self.schemas}
        self._counters: dict[str, int] = {}
        self._tokens: dict[str, datetime] = {}
        self._locators: dict[str, list[dict[str, Any]]] = {}
        self._locked_rows = 0
        self.route("POST", r"/services/oauth2/token", self._token)
        self.route("GET", r"/services/data/?", self._plain(self._versions))
        self.route("GET", _API + r"/limits/?", self._api(self._limits))
        self.route("GET", _API + r"/sobjects/(?P<obj>\w+)/describe/?", self._api(self._describe))
        self.route("GET", _API + r"/sobjects/(?P<obj>\w+)/(?P<id>\w{15,18})", self._api(self._retrieve))
        self.route("GET", _API + r"/(?P<res>query|queryAll)/?", self._api(self._query))
        self.route("GET", _API + r"/query(?:All)?/(?P<loc>01g\w+)-(?P<at>\d+)", self._api(self._more))
        self.route("PATCH", _API + r"/composite/sobjects/(?P<obj>\w+)/(?P<ext>\w+)", self._api(self._upsert))
        self.route("PATCH", _API + r"/composite/sobjects/?", self._api(self._update))
        self.route("DELETE", _API + r"/composite/sobjects/?", self._api(self._delete))

    # --- knobs and faults ---------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Make the next ``n`` API calls fail with ``status`` (a Salesforce-shaped error array)."""
        code = {500: "UNKNOWN_EXCEPTION", 503: "SERVER_UNAVAILABLE"}.get(status, "UNKNOWN_EXCEPTION")
        body = [{"message": "emulated failure", "errorCode": code}]
        self.inject(EmuResponse(status, body), count=n, path_prefix="/services/data/v")

    def throttle_next(self, n: int = 1, *, daily: bool = False) -> None:
        """Make the next ``n`` API calls answer 403 ``REQUEST_LIMIT_EXCEEDED`` (no Retry-After)."""
        which = "TotalRequests" if daily else "ConcurrentPerOrgLongTxn"
        body = [{"message": f"{which} Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        self.inject(EmuResponse(403, body), count=n, path_prefix="/services/data/v")

    def slow_next(self, n: int, seconds: float) -> None:
        """Delay the next ``n`` API calls by ``seconds`` before answering normally."""
        self.inject(None, count=n, delay=seconds, path_prefix="/services/data/v")

    def lock_next_rows(self, n: int = 1) -> None:
        """Make the next ``n`` record writes fail with ``UNABLE_TO_LOCK_ROW``."""
        with self._lock:
            self._locked_rows += n

    def expire_all_tokens(self) -> None:
        """Invalidate every issued session (the next call answers 401 INVALID_SESSION_ID)."""
        with self._lock:
            self._tokens.clear()

    def expire_locators(self) -> None:
        """Forget every open query locator (their pages answer 400 INVALID_QUERY_LOCATOR)."""
        with self._lock:
            self._locators.clear()

    # --- direct data access (no validation, no API usage) -------------------------------
    def insert(self, obj: str, fields: Mapping[str, Any], *, at: datetime | None = None) -> str:
        """Create a record directly; ``at`` back-dates its SystemModstamp (late commits)."""
        with self._lock:
            return self._create(self._schema_of(obj), dict(fields), at)

    def update(
        self, obj: str, record_id: str, fields: Mapping[str, Any], *, at: datetime | None = None
    ) -> None:
        """Change a record directly and bump its SystemModstamp."""
        with self._lock:
            record = self._records[obj][record_id]
            record.update(fields)
            self._touch(self._schema_of(obj), record, at)

    def delete(self, obj: str, record_id: str, *, at: datetime | None = None) -> None:
        """Soft-delete a record (IsDeleted, visible to queryAll only)."""
        with self._lock:
            record = self._records[obj][record_id]
            record["IsDeleted"] = True
            self._touch(self._schema_of(obj), record, at)

    def get(self, obj: str, record_id: str) -> dict[str, Any] | None:
        """A copy of one record (deleted ones included), or None."""
        with self._lock:
            record = self._records.get(obj, {}).get(record_id)
            return dict(record) if record is not None else None

    def all(self, obj: str, *, include_deleted: bool = True) -> list[dict[str, Any]]:
        """Copies of every record of ``obj``, in creation order."""
        with self._lock:
            return [
                dict(r) for r in self._records.get(obj, {}).values() if include_deleted or not r["IsDeleted"]
            ]

    def purge_deleted(self) -> None:
        """Empty the Recycle Bin: soft-deleted rows disappear from queryAll too."""
        with self._lock:
            for rows in self._records.values():
                for rid in [k for k, r in rows.items() if r["IsDeleted"]]:
                    del rows[rid]

    def seed_demo(self) -> None:
        """Create a handful of demo accounts and opportunities."""
        accounts = [
            ("Acme Consulting GmbH", "C-10042", "DE", "Berlin"),
            ("Northwind Advisory Ltd", "C-10043", "GB", "London"),
            ("Globex Engineering SA", "C-10044", "FR", "Lyon"),
        ]
        for name, erp, country, city in accounts:
            account_id = self.insert(
                "Account", {"Name": name, "ERP_Id__c": erp, "BillingCountry": country, "BillingCity": city}
            )
            for n, (stage, amount) in enumerate((("Proposal", "48000.00"), ("Closed Won", "12500.50"))):
                self.insert(
                    "Opportunity",
                    {
                        "Name": f"{name.split()[0]} - Phase {n + 1}",
                        "AccountId": account_id,
                        "StageName": stage,
                        "Amount": Decimal(amount),
                        "CloseDate": "2025-06-30",
                        "ERP_Id__c": f"P-{erp[2:]}-{n + 1}",
                    },
                )

    # --- plumbing ---------------------------------------------------------------------
    def not_found(self, request: EmuRequest) -> EmuResponse:
        """Salesforce's 404 body for unknown resources."""
        return _SfError(404, "NOT_FOUND", "The requested resource does not exist").response()

    def _headers(self, *, usage: bool) -> dict[str, str]:
        headers = {"Date": format_datetime(self.now(), usegmt=True)}
        if usage:
            headers["Sforce-Limit-Info"] = f"api-usage={self.api_used}/{self.daily_limit}"
        return headers

    def _plain(self, handler: Callable[[EmuRequest], Any]) -> Callable[[EmuRequest], EmuResponse]:
        def serve(request: EmuRequest) -> EmuResponse:
            return EmuResponse(200, handler(request), self._headers(usage=False))

        return serve

    def _api(self, handler: Callable[[EmuRequest], Any]) -> Callable[[EmuRequest], EmuResponse]:
        def serve(request: EmuRequest) -> EmuResponse:
            try:
                if request.match["v"] not in self.api_versions:
                    raise _SfError(404, "NOT_FOUND", "The requested resource does not exist")
                auth = request.header("authorization") or ""
                token = auth[7:] if auth.startswith("Bearer ") else ""
                expires = self._tokens.get(token)
                if expires is None or expires <= self.now():
                    raise _SfError(401, "INVALID_SESSION_ID", "Session expired or invalid")
                if self.api_used >= self.daily_limit:
                    raise _SfError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
                self.api_used += 1
                response = EmuResponse(200, handler(request), self._headers(usage=True))
            except _SfError as exc:
                failed = exc.response()
                response = EmuResponse(failed.status, failed.body, self._headers(usage=True))
            return response

        return serve

    def _schema_of(self, obj: str) -> SfSchema:
        for name, schema in self.schemas.items():
            if name.lower() == obj.lower():
                return schema
        raise _SfError(400, "INVALID_TYPE", f"sObject type '{obj}' is not supported.")

    def _new_id(self, prefix: str) -> str:
        n = self._counters.get(prefix, 0) + 1
        self._counters[prefix] = n
        digits = ""
        while len(digits) < 10:
            n, r = divmod(n, 62)
            digits = _B62[r] + digits
        short = prefix + "8W" + digits
        suffix = ""
        for chunk in (short[0:5], short[5:10], short[10:15]):
            bits = sum(1 << i for i, ch in enumerate(chunk) if "A" <= ch <= "Z")
            suffix += _SUFFIX[bits]
        return short + suffix

    def _stamp(self, at: datetime | None) -> datetime:
        return (at or self.now()).astimezone(UTC).replace(microsecond=0)

    def _touch(self, schema: SfSchema, record: dict[str, Any], at: datetime | None) -> None:
        stamp = self._stamp(at)
        record["SystemModstamp"] = record["LastModifiedDate"] = stamp
        if schema.name == "Opportunity" and record.get("StageName") in STAGES:
            record["IsClosed"], record["IsWon"] = STAGES[record["StageName"]]

    def _create(self, schema: SfSchema, fields: dict[str, Any], at: datetime | None) -> str:
        record_id = self._new_id(schema.key_prefix)
        record: dict[str, Any] = {name: None for name in schema.fields}
        record.update(fields, Id=record_id, IsDeleted=False, CreatedDate=self._stamp(at))
        self._touch(schema, record, at)
        self._records[schema.name][record_id] = record
        return record_id

    # --- OAuth ------------------------------------------------------------------------
    def _token(self, request: EmuRequest) -> EmuResponse:
        form = {k: v[0] for k, v in parse_qs(request.body.decode(), keep_blank_values=True).items()}
        grant = form.get("grant_type")
        if grant == "client_credentials":
            client_id, secret = form.get("client_id"), form.get("client_secret")
            basic = request.header("authorization") or ""
            if basic.startswith("Basic "):
                client_id, _, secret = base64.b64decode(basic[6:]).decode().partition(":")
            if client_id not in self.clients:
                return self._oauth_error("invalid_client_id", "client identifier invalid")
            if not hmac.compare_digest(self.clients[client_id], secret or ""):
                return self._oauth_error("invalid_client", "invalid client credentials")
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            problem = self._check_assertion(form.get("assertion") or "")
            if problem:
                return self._oauth_error("invalid_grant", problem)
        else:
            return self._oauth_error("unsupported_grant_type", "grant type not supported")
        token = f"00D8W000000emu!{secrets.token_urlsafe(24)}"
        self._tokens[token] = self.now() + self.token_lifetime
        self.tokens_issued += 1
        instance = f"http://{request.header('host') or '127.0.0.1'}"
        body = {
            "access_token": token,
            "instance_url": instance,
            "token_type": "Bearer",
            "id": f"{instance}/id/00D8W000000emuAAA/0058W000000emuAAA",
            "issued_at": str(int(self.now().timestamp() * 1000)),
            "signature": base64.b64encode(secrets.token_bytes(32)).decode(),
            "scope": "api",
        }
        return EmuResponse(200, body, self._headers(usage=False))

    def _oauth_error(self, error: str, description: str) -> EmuResponse:
        status = 401 if error == "invalid_client" else 400
        return EmuResponse(
            status, {"error": error, "error_description": description}, self._headers(usage=False)
        )

    def _check_assertion(self, assertion: str) -> str | None:
        try:
            head_b64, claims_b64, sig_b64 = assertion.split(".")
            header = json.loads(_unb64(head_b64))
            claims = json.loads(_unb64(claims_b64))
            signature = _unb64(sig_b64)
        except ValueError:
            return "invalid assertion"
        key = self.jwt_keys.get(str(claims.get("iss")))
        if key is None or header.get("alg") != "HS256":
            return "invalid assertion"
        expected = hmac.new(key.encode(), f"{head_b64}.{claims_b64}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            return "invalid assertion"
        if claims.get("aud") != self.jwt_audience:
            return "audience is invalid"
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= self.now().timestamp():
            return "expired authorization code"
        if not claims.get("sub"):
            return "user hasn't approved this consumer"
        return None

    # --- REST resources -----------------------------------------------------------------
    def _versions(self, request: EmuRequest) -> list[dict[str, str]]:
        return [
            {"label": f"Release {v}", "url": f"/services/data/v{v}", "version": v} for v in self.api_versions
        ]

    def _limits(self, request: EmuRequest) -> dict[str, Any]:
        remaining = max(self.daily_limit - self.api_used, 0)
        return {"DailyApiRequests": {"Max": self.daily_limit, "Remaining": remaining}}

    def _describe(self, request: EmuRequest) -> dict[str, Any]:
        schema = self._schema_of(request.match["obj"])
        fields = [
            {
                "name": f.name,
                "label": f.name,
                "type": f.type,
                "externalId": f.external_id,
                "unique": f.unique,
                "nillable": not f.required and f.type != "boolean",
                "createable": f.updateable,
                "updateable": f.updateable,
                "length": f.length,
                "idLookup": f.name == "Id" or f.external_id,
                "picklistValues": [{"value": v, "label": v, "active": True} for v in f.picklist],
            }
            for f in schema.fields.values()
        ]
        return {
            "name": schema.name,
            "label": schema.name,
            "keyPrefix": schema.key_prefix,
            "queryable": True,
            "createable": True,
            "updateable": True,
            "fields": fields,
        }

    def _retrieve(self, request: EmuRequest) -> dict[str, Any]:
        schema = self._schema_of(request.match["obj"])
        record = self._records[schema.name].get(request.match["id"])
        if record is None or record["IsDeleted"]:
            raise _SfError(404, "NOT_FOUND", "The requested resource does not exist")
        return self._render(schema, record, list(schema.fields), request.match["v"])

    def _render(
        self, schema: SfSchema, record: Mapping[str, Any], names: Sequence[str], v: str
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {
                "type": schema.name,
                "url": f"/services/data/v{v}/sobjects/{schema.name}/{record['Id']}",
            }
        }
        for name in names:
            value = record.get(name)
            out[name] = value.strftime("%Y-%m-%dT%H:%M:%S.000+0000") if isinstance(value, datetime) else value
        return out

    def _query(self, request: EmuRequest) -> dict[str, Any]:
        soql = request.arg("q")
        if not soql:
            raise _SfError(400, "MALFORMED_QUERY", "A query string has to be specified")
        try:
            query = parse_soql(soql)
            schema = self._schema_of(query.obj)
            validate(query.where, schema)
        except SoqlError as exc:
            raise _SfError(400, exc.code, exc.message) from exc
        names = []
        for name in query.fields:
            f = schema.find(name)
            if f is None:
                raise _SfError(400, "INVALID_FIELD", f"No such column '{name}' on entity '{schema.name}'.")
            names.append(f.name)
        rows = [
            r
            for r in self._records[schema.name].values()
            if (request.match["res"] == "queryAll" or not r["IsDeleted"])
            and (query.where is None or evaluate(query.where, r, schema))
        ]
        for name, descending in reversed(query.order):
            f = schema.find(name)
            if f is None:
                raise _SfError(400, "INVALID_FIELD", f"No such column '{name}' on entity '{schema.name}'.")
            rows.sort(key=_sort_key(f.name), reverse=descending)
        if query.limit is not None:
            rows = rows[: query.limit]
        rendered = [self._render(schema, r, names, request.match["v"]) for r in rows]
        size = min(self.page_size, _batch_size(request.header("sforce-query-options")))
        locator = "01g8W" + secrets.token_hex(6).upper() if len(rendered) > size else None
        if locator:
            self._locators[locator] = rendered
        return self._page(rendered, 0, size, locator, request.match["v"])

    def _more(self, request: EmuRequest) -> dict[str, Any]:
        rendered = self._locators.get(request.match["loc"])
        if rendered is None:
            raise _SfError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        size = min(self.page_size, _batch_size(request.header("sforce-query-options")))
        return self._page(rendered, int(request.match["at"]), size, request.match["loc"], request.match["v"])

    def _page(
        self, rows: list[dict[str, Any]], at: int, size: int, locator: str | None, v: str
    ) -> dict[str, Any]:
        page = {"totalSize": len(rows), "done": at + size >= len(rows), "records": rows[at : at + size]}
        if not page["done"]:
            page["nextRecordsUrl"] = f"/services/data/v{v}/query/{locator}-{at + size}"
        return page

    # --- sObject Collections ------------------------------------------------------------
    def _collection(self, request: EmuRequest) -> tuple[list[dict[str, Any]], bool]:
        try:
            body = request.json()
        except ValueError as exc:
            raise _SfError(400, "JSON_PARSER_ERROR", "request body is not JSON") from exc
        records = body.get("records") if isinstance(body, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise _SfError(400, "JSON_PARSER_ERROR", "records must be a list of objects")
        if len(records) > 200:
            raise _SfError(
                400, "EXCEEDED_ID_LIMIT", "record limit reached. cannot submit more than 200 records"
            )
        for r in records:
            if not isinstance(r.get("attributes"), dict) or not r["attributes"].get("type"):
                raise _SfError(400, "INVALID_TYPE", "each record needs attributes.type")
        return records, bool(body.get("allOrNone", False))

    def _upsert(self, request: EmuRequest) -> list[dict[str, Any]]:
        schema = self._schema_of(request.match["obj"])
        ext = schema.find(request.match["ext"])
        if ext is None or not (ext.external_id or ext.name == "Id"):
            raise _SfError(
                404,
                "NOT_FOUND",
                f"Provided external ID field does not exist or is not accessible: {request.match['ext']}",
            )
        records, all_or_none = self._collection(request)
        for r in records:
            if r["attributes"]["type"] != schema.name:
                raise _SfError(400, "INVALID_TYPE", f"records must all be {schema.name}")

        def write(r: dict[str, Any]) -> dict[str, Any]:
            fields = {k: v for k, v in r.items() if k != "attributes"}
            value = next((v for k, v in fields.items() if k.lower() == ext.name.lower()), None)
            if value in (None, ""):
                raise RowFailure("MISSING_ARGUMENT", f"{ext.name} not specified", [ext.name])
            existing = [
                x
                for x in self._records[schema.name].values()
                if not x["IsDeleted"] and x.get(ext.name) == value
            ]
            if len(existing) > 1:
                raise RowFailure(
                    "DUPLICATE_EXTERNAL_ID", f"{ext.name}: more than one record found", [ext.name]
                )
            record_id = self._save(schema, fields, existing[0] if existing else None)
            return {"id": record_id, "success": True, "errors": [], "created": not existing}

        return self._run_rows(records, all_or_none, write)

    def _update(self, request: EmuRequest) -> list[dict[str, Any]]:
        records, all_or_none = self._collection(request)

        def write(r: dict[str, Any]) -> dict[str, Any]:
            schema = self._schema_of(r["attributes"]["type"])
            fields = {k: v for k, v in r.items() if k not in ("attributes", "id", "Id")}
            current = self._records[schema.name].get(str(r.get("id") or r.get("Id") or ""))
            if current is None:
                raise RowFailure("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
            if current["IsDeleted"]:
                raise RowFailure("ENTITY_IS_DELETED", "entity is deleted")
            return {"id": self._save(schema, fields, current), "success": True, "errors": []}

        return self._run_rows(records, all_or_none, write)

    def _delete(self, request: EmuRequest) -> list[dict[str, Any]]:
        ids = [i for i in (request.arg("ids") or "").split(",") if i]
        if len(ids) > 200:
            raise _SfError(400, "EXCEEDED_ID_LIMIT", "cannot delete more than 200 records")
        all_or_none = (request.arg("allOrNone") or "false").lower() == "true"

        def remove(record_id: str) -> dict[str, Any]:
            owner = next((name for name, rows in self._records.items() if record_id in rows), None)
            if owner is None:
                raise RowFailure("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
            found = self._records[owner][record_id]
            if found["IsDeleted"]:
                raise RowFailure("ENTITY_IS_DELETED", "entity is deleted")
            self._take_lock(record_id)
            found["IsDeleted"] = True
            self._touch(self.schemas[owner], found, None)
            return {"id": record_id, "success": True, "errors": []}

        results = self._run_rows(ids, all_or_none, remove)
        for record_id, result in zip(ids, results, strict=True):
            result.setdefault("id", record_id)
        return results

    def _run_rows(
        self, items: Sequence[Any], all_or_none: bool, write: Callable[[Any], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        snapshot = copy.deepcopy(self._records) if all_or_none else None
        results: list[dict[str, Any]] = []
        for item in items:
            try:
                results.append(write(item))
            except RowFailure as exc:
                results.append({"success": False, "errors": [exc.error]})
        if snapshot is not None and any(not r["success"] for r in results):
            self._records = snapshot
            rolled = {
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid and the request "
                "was using AllOrNone header",
                "fields": [],
            }
            results = [r if not r["success"] else {"success": False, "errors": [rolled]} for r in results]
        return results

    def _take_lock(self, record_id: str) -> None:
        if self._locked_rows > 0:
            self._locked_rows -= 1
            raise RowFailure(
                "UNABLE_TO_LOCK_ROW",
                f"unable to obtain exclusive access to this record or 1 records: {record_id}",
            )

    def _save(self, schema: SfSchema, fields: dict[str, Any], current: dict[str, Any] | None) -> str:
        clean = check_write(schema, fields, current, self._records[schema.name].values())
        self._take_lock(current["Id"] if current else "new")
        if current is None:
            return self._create(schema, clean, None)
        current.update(clean)
        self._touch(schema, current, None)
        return str(current["Id"])


def _sort_key(name: str) -> Callable[[Mapping[str, Any]], tuple[bool, Any]]:
    # SOQL sorts nulls first in ascending order
    return lambda record: (record.get(name) is not None, record.get(name))


def _batch_size(header: str | None) -> int:
    match = re.search(r"batchSize=(\d+)", header or "")
    return 2000 if match is None else max(200, min(2000, int(match.group(1))))


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

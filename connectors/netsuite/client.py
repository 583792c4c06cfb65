"""The NetSuite connector: a Source (SuiteQL by ``lastmodifieddate``) and a Sink (REST records).

Usage::

    from connectors.auth import BearerAuth
    from connectors.http import make_client
    from connectors.netsuite import NetSuiteConnector, NetSuiteM2M, standard_records

    client = make_client("https://1234567-sb1.suitetalk.api.netsuite.com")
    tokens = NetSuiteM2M(client, client_id="...", certificate_id="...", signer=sign_ps256)
    erp = NetSuiteConnector("netsuite", client, auth=BearerAuth(tokens), records=standard_records())

Streams are the record names (``customer``, ``job``, ``invoice``, ``customerpayment``) plus,
when ``deletes`` is configured, ``<name>:deleted`` read from the deleted-records table. Auth is
OAuth 2.0 client credentials with a signed JWT client assertion (``NetSuiteM2M``): tokens live
an hour with no refresh token, so the grant runs again ``margin`` before expiry, and once more
when a request meets 401 ``INVALID_LOGIN`` (``BearerAuth``). The signer is pluggable: the
private key stays wherever the caller keeps it (PS256/ES256 for NetSuite; HS256 for the emulator).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal

import httpx

from agent.errors import AuthError, PermanentError, RetryableError, SyncAgentError
from agent.model import Batch, Cursor, Op, Outcome, Problem, utcnow
from connectors.auth import Signer, encode_jwt
from connectors.http import HttpStatusFailure, classify_http, json_body, raise_for_status
from connectors.netsuite.sink import RECORD_PATH, RecordWriter
from connectors.netsuite.source import StreamSpec, SuiteQLReader, select_list

TOKEN_PATH = "/services/rest/auth/oauth2/v1/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MIN_LOOKBACK = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class NsRecord:
    """One NetSuite record type as the connector reads (SuiteQL) and writes (REST) it.

    ``fields`` are SuiteQL column names; ``rest_names`` maps a column to its REST property
    when they differ (``companyname`` -> ``companyName``); ``refs`` are columns written as
    ``{"id": ...}`` references; ``dates``/``timestamps`` are read through ``TO_CHAR``.
    ``type_filter`` narrows a shared table (``transaction``) to one type (``CustInvc``).
    ``required`` are columns NetSuite makes mandatory on create: a unit checks them before
    its first write.
    """

    record_type: str
    table: str
    fields: tuple[str, ...]
    external_id_field: str = "externalid"
    type_filter: str | None = None
    rest_names: Mapping[str, str] = field(default_factory=dict)
    refs: frozenset[str] = frozenset()
    dates: frozenset[str] = frozenset()
    timestamps: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in (self.record_type, self.table, self.external_id_field, *self.fields):
            if not _IDENT.match(name):
                raise ValueError(f"not a SuiteQL identifier: {name!r}")


@dataclass(frozen=True, slots=True)
class NsDeletes:
    """Where deletions are read from: a SuiteQL table of deleted records [unverified per account]."""

    table: str = "deletedrecord"
    type_column: str = "type"
    id_column: str = "recordid"
    date_column: str = "deleteddate"
    external_id_column: str | None = "externalid"
    type_values: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            self.table,
            self.type_column,
            self.id_column,
            self.date_column,
            self.external_id_column or "x",
        ):
            if not _IDENT.match(name):
                raise ValueError(f"not a SuiteQL identifier: {name!r}")


def standard_records() -> dict[str, NsRecord]:
    """Return the quote-to-cash records syncagent maps by default: customer, job, invoice, payment."""
    ext = {
        "externalid": "externalId",
        "entityid": "entityId",
        "companyname": "companyName",
        "tranid": "tranId",
        "trandate": "tranDate",
    }
    return {
        "customer": NsRecord(
            "customer",
            "customer",
            ("entityid", "companyname", "subsidiary", "currency", "email", "externalid"),
            rest_names=ext,
            refs=frozenset({"subsidiary", "currency"}),
            required=frozenset({"companyname"}),
        ),
        "job": NsRecord(
            "job",
            "job",
            (
                "entityid",
                "companyname",
                "parent",
                "jobtype",
                "entitystatus",
                "percentcomplete",
                "startdate",
                "externalid",
            ),
            rest_names={
                **ext,
                "jobtype": "jobType",
                "entitystatus": "entityStatus",
                "percentcomplete": "percentComplete",
                "startdate": "startDate",
            },
            refs=frozenset({"parent", "jobtype", "entitystatus"}),
            dates=frozenset({"startdate"}),
            required=frozenset({"companyname"}),
        ),
        "invoice": NsRecord(
            "invoice",
            "transaction",
            ("entity", "tranid", "trandate", "foreigntotal", "status", "currency", "externalid"),
            type_filter="CustInvc",
            rest_names={**ext, "foreigntotal": "total"},
            refs=frozenset({"entity", "status", "currency"}),
            dates=frozenset({"trandate"}),
        ),
        # appliedinvoice is read-only here: to apply a payment, send NetSuite's "apply" sublist shape.
        "customerpayment": NsRecord(
            "customerpayment",
            "transaction",
            ("entity", "tranid", "trandate", "foreigntotal", "appliedinvoice", "currency", "externalid"),
            type_filter="CustPymt",
            rest_names={**ext, "entity": "customer", "foreigntotal": "payment", "appliedinvoice": "apply"},
            refs=frozenset({"entity", "currency"}),
            dates=frozenset({"trandate"}),
        ),
    }


class NetSuiteM2M:
    """Token provider for NetSuite's OAuth 2.0 client-credentials grant with a JWT assertion."""

    def __init__(
        self,
        client: httpx.Client,
        *,
        client_id: str,
        certificate_id: str,
        signer: Signer,
        algorithm: str = "PS256",
        scopes: tuple[str, ...] = ("rest_webservices",),
        token_path: str = TOKEN_PATH,
        clock: Callable[[], datetime] = utcnow,
        margin: timedelta = timedelta(minutes=5),
        assertion_lifetime: timedelta = timedelta(minutes=5),
    ) -> None:
        if assertion_lifetime > timedelta(hours=1):
            raise ValueError("NetSuite accepts assertions valid for at most one hour")
        self._client = client
        self._client_id = client_id
        self._certificate_id = certificate_id
        self._signer = signer
        self._algorithm = algorithm
        self._scopes = list(scopes)
        self._token_path = token_path
        self._clock = clock
        self._margin = margin
        self._assertion_lifetime = assertion_lifetime
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at: datetime | None = None
        self.fetches = 0

    def token(self) -> str:
        """Return the cached access token, running the grant when none is valid past the margin."""
        with self._lock:
            if self._token is None or self._refresh_at is None or self._clock() >= self._refresh_at:
                self._fetch()
            assert self._token is not None
            return self._token

    def invalidate(self) -> None:
        """Forget the token (NetSuite refused it); the next ``token()`` runs the grant again."""
        with self._lock:
            self._token = None
            self._refresh_at = None

    def assertion(self) -> str:
        """Build and sign a fresh client assertion (``kid`` = certificate id, ``aud`` = token URL)."""
        issued = int(self._clock().timestamp())
        claims = {
            "iss": self._client_id,
            "scope": self._scopes,
            "aud": str(self._client.base_url.join(self._token_path)),
            "iat": issued,
            "exp": issued + int(self._assertion_lifetime.total_seconds()),
        }
        header = {"typ": "JWT", "alg": self._algorithm, "kid": self._certificate_id}
        return encode_jwt(header, claims, self._signer)

    def _fetch(self) -> None:
        issued = self._clock()
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        with classify_http(rules=_token_rule, clock=self._clock):
            response = raise_for_status(self._client.post(self._token_path, data=form, auth=httpx.Auth()))
        body = json_body(response)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise AuthError("NetSuite token endpoint answered without an access_token")
        try:
            lifetime = timedelta(seconds=float(body.get("expires_in", 3600)))
        except (TypeError, ValueError):
            lifetime = timedelta(hours=1)
        self.fetches += 1
        self._token = body["access_token"]
        self._refresh_at = issued + max(lifetime - self._margin, timedelta(0))


def _token_rule(failure: HttpStatusFailure) -> SyncAgentError | None:
    if 400 <= failure.status < 500 and failure.status != 429:
        return AuthError(f"NetSuite refused the client assertion: {failure.error_code or failure.status}")
    return None


class NetSuiteConnector:
    """NetSuite as an ERP: reads changes with SuiteQL and writes records through REST."""

    def __init__(
        self,
        name: str,
        client: httpx.Client,
        *,
        auth: httpx.Auth,
        records: Mapping[str, NsRecord],
        page_size: int = 1000,
        lookback: timedelta = _MIN_LOOKBACK,
        query_cap: int = 100_000,
        clock: Callable[[], datetime] = utcnow,
        deletes: NsDeletes | None = NsDeletes(),
        query_zone: tzinfo = UTC,
        throttle_backoff: float = 5.0,
    ) -> None:
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000 (NetSuite's limit)")
        if lookback < _MIN_LOOKBACK:
            raise ValueError("lookback must be at least 15 minutes for NetSuite")
        if query_cap < page_size:
            raise ValueError("query_cap must be at least page_size")
        self.name = name
        self._client = client
        self._auth = auth
        self._records = dict(records)
        self._deletes = deletes
        self._specs = self._build_specs()
        self._reader = SuiteQLReader(
            name,
            client,
            auth,
            page_size=page_size,
            lookback=lookback,
            query_cap=query_cap,
            zone=query_zone,
            clock=clock,
            throttle_backoff=throttle_backoff,
        )
        self._writer = RecordWriter(name, client, auth, self._records, throttle_backoff=throttle_backoff)

    def _build_specs(self) -> dict[str, StreamSpec]:
        specs: dict[str, StreamSpec] = {}
        for stream, rec in self._records.items():
            fields = (
                rec.fields if rec.external_id_field in rec.fields else (*rec.fields, rec.external_id_field)
            )
            specs[stream] = StreamSpec(
                stream,
                rec.record_type,
                rec.table,
                "lastmodifieddate",
                "id",
                "update",
                ("type", rec.type_filter) if rec.type_filter else None,
                select_list("lastmodifieddate", "id", fields, rec.dates, rec.timestamps),
                rec.dates,
                rec.timestamps,
            )
            d = self._deletes
            if d is not None:
                extra = (d.external_id_column,) if d.external_id_column else ()
                specs[f"{stream}:deleted"] = StreamSpec(
                    f"{stream}:deleted",
                    rec.record_type,
                    d.table,
                    d.date_column,
                    d.id_column,
                    "delete",
                    (d.type_column, d.type_values.get(rec.record_type, rec.record_type)),
                    select_list(d.date_column, d.id_column, extra, frozenset(), frozenset()),
                )
        return specs

    def streams(self) -> Sequence[str]:
        """Return the stream names: one per record, plus ``<record>:deleted`` when deletes are read."""
        return list(self._specs)

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return the next batch of changes of ``stream`` after ``cursor``."""
        spec = self._specs.get(stream)
        if spec is None:
            raise PermanentError(f"{self.name} has no stream {stream!r}")
        return self._reader.read(spec, cursor, limit)

    def cursor_for_time(self, stream: str, when: datetime) -> Cursor:
        """A cursor that re-reads ``stream`` from ``when`` (an operator's rewind)."""
        return Cursor({"v": 1, "ts": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "id": "0"})

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Nothing to acknowledge: NetSuite keeps no read position for us."""

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Write ``ops`` one record per request; one outcome per op, in order (units as sagas)."""
        return self._writer.apply(ops)

    @property
    def records(self) -> Mapping[str, NsRecord]:
        """The record definitions this connector reads and writes, by mapped object name."""
        return dict(self._records)

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return the current records of ``object_name`` by internal id; ``None`` where there is none.

        SuiteQL ``WHERE id IN (...)`` in pages of ``page_size`` ids, with the same columns
        (and the same date handling) as the record's change stream, so a fetched record
        carries the values a captured change would.
        """
        spec = self._specs.get(object_name)
        if spec is None:
            raise PermanentError(f"{self.name} has no record {object_name!r} mapped")
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        wanted = sorted({int(i) for i in out if str(i).isdigit()})
        found = self._reader.fetch(spec, wanted)
        for i in out:
            if str(i).isdigit():
                out[i] = found.get(int(i))
        return out

    def check(self) -> list[Problem]:
        """Check the token, SuiteQL access to every stream's table and REST access to each record."""
        problems: list[Problem] = []
        for stream, spec in self._specs.items():
            deleted = spec.op == "delete"
            try:
                self._reader.probe(spec.table, spec.id_column, spec.filter)
            except AuthError as exc:
                return [
                    Problem(
                        f"{self.name}: credentials",
                        str(exc),
                        "check the M2M mapping (entity, role, certificate) and the certificate expiry",
                    )
                ]
            except SyncAgentError as exc:
                fix = (
                    (
                        "the deleted-records table may not exist in this account: set deletes=None or "
                        "reconcile ids periodically"
                    )
                    if deleted
                    else "grant the role access to this record type"
                )
                severity: Literal["error", "warning"] = (
                    "warning" if deleted or isinstance(exc, RetryableError) else "error"
                )
                problems.append(Problem(f"{self.name}.{stream}", str(exc), fix, severity))
        for name, rec in self._records.items():
            try:
                with classify_http():
                    raise_for_status(
                        self._client.get(
                            f"{RECORD_PATH}/{rec.record_type}", params={"limit": 1}, auth=self._auth
                        )
                    )
            except SyncAgentError as exc:
                severity = "warning" if isinstance(exc, RetryableError) else "error"
                problems.append(
                    Problem(
                        f"{self.name}.{name}",
                        str(exc),
                        "grant the role REST access to this record type",
                        severity,
                    )
                )
        return problems

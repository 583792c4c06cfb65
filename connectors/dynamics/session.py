"""Table configuration and HTTP plumbing shared by the Dataverse reader, writer and checks.

``DvSession`` sends every request with the OData headers and the bearer auth, classifies
failures at this boundary (``connectors.http.classify_http``; ExpiredVersionStamp becomes
``CursorUnavailable``), keeps next links on the configured host, and remembers the server's
``Date`` header so pollers can take "now" from Dataverse rather than from this host.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from agent.errors import CursorUnavailable, DataError, PermanentError, SyncAgentError
from connectors.dynamics.odata import format_datetime
from connectors.http import HttpStatusFailure, classify_http, json_body, raise_for_status

logger = logging.getLogger(__name__)

EXPIRED_VERSION_STAMP = "0x80044352"  # "Version stamp associated with the client has expired"
_BASE_HEADERS = {"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"}


@dataclass(frozen=True, slots=True)
class DvTable:
    """One Dataverse table the connector reads and writes.

    ``entity_set`` is the URL name (``accounts``), ``logical_name`` the table's name
    (``account``), ``fields`` the columns read into a change, ``alternate_key`` the columns of
    the key to upsert on (None: updates by primary key only), ``change_tracking`` picks
    delta links (True) or ``modifiedon`` polling (False).
    """

    entity_set: str
    logical_name: str
    primary_key: str
    fields: tuple[str, ...]
    alternate_key: tuple[str, ...] | None = None
    change_tracking: bool = True

    def select(self) -> str:
        """The ``$select`` list: configured fields plus the key and version columns."""
        extra = (self.primary_key, "modifiedon", "versionnumber")
        return ",".join(dict.fromkeys((*self.fields, *extra)))


def expired_token_rule(stream: str) -> Callable[[HttpStatusFailure], SyncAgentError | None]:
    """A ``classify_http`` rule turning ExpiredVersionStamp into ``CursorUnavailable``."""

    def rule(failure: HttpStatusFailure) -> SyncAgentError | None:
        if (failure.error_code or "").lower() == EXPIRED_VERSION_STAMP:
            return CursorUnavailable(
                f"dataverse stream {stream}: the delta token has expired or is invalid (older than the "
                "org's change-tracking retention, ExpireChangeTrackingInDays); a resync is needed: "
                "re-read the table with a resync to get a fresh delta token"
            )
        return None

    return rule


def to_json(value: Any) -> str:
    """Render a request body as JSON with Decimals as exact numbers and datetimes as ``...Z``."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise DataError("body", None, "a non-finite number cannot be sent to Dataverse")
        return str(value)
    if isinstance(value, datetime):
        return json.dumps(format_datetime(value))
    if isinstance(value, date):
        return json.dumps(value.isoformat())
    return json.dumps(value)


def parse_timestamp(text: object) -> datetime | None:
    """Parse a Dataverse timestamp (``2024-05-01T08:15:02Z``) into an aware datetime."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def delta_token_of(link: str) -> str:
    """Pull the ``$deltatoken`` value out of an ``@odata.deltaLink``."""
    values = parse_qs(urlsplit(link).query).get("$deltatoken")
    if not values:
        raise PermanentError("the @odata.deltaLink carries no $deltatoken")
    return values[0]


class DvSession:
    """Sends Dataverse requests: OData headers, per-request auth, classification, server time."""

    def __init__(
        self, client: httpx.Client, auth: httpx.Auth, api_path: str, clock: Callable[[], datetime]
    ) -> None:
        self.client = client
        self.auth = auth
        self.api_path = api_path.rstrip("/")
        self.clock = clock
        self.calls = 0
        self._server_time: tuple[datetime, datetime] | None = None

    def path(self, resource: str) -> str:
        """The URL path of a resource under the API root (``accounts``, ``WhoAmI``)."""
        return f"{self.api_path}/{resource}"

    def send(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> httpx.Response:
        """Send one request and return the response whatever its status (transport errors raise)."""
        merged = {**_BASE_HEADERS, **(headers or {})}
        content = None
        if body is not None:
            content = to_json(body).encode()
            merged["Content-Type"] = "application/json; charset=utf-8"
        with classify_http(clock=self.clock):
            response = self.client.request(
                method, url, params=params, headers=merged, content=content, auth=self.auth
            )
            response.read()
        self.calls += 1
        self._observe(response)
        return response

    def get_json(
        self,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        rules: Callable[[HttpStatusFailure], SyncAgentError | None] | None = None,
    ) -> dict[str, Any]:
        """GET a JSON object (numbers with fractions as Decimal); failures raise classified."""
        response = self.send("GET", url, params=params, headers={"If-None-Match": "null", **(headers or {})})
        with classify_http(rules=rules, clock=self.clock):
            raise_for_status(response)
        page = json_body(response)
        if not isinstance(page, dict):
            raise PermanentError(f"GET {response.request.url.path} did not answer a JSON object")
        return page

    def raise_for(self, response: httpx.Response) -> None:
        """Raise the classified error for a failed response (429, 5xx, 401/403, ...)."""
        with classify_http(clock=self.clock):
            raise_for_status(response)

    def local(self, link: str) -> str:
        """Reduce a next/delta link to path and query, refusing links to another host."""
        url = httpx.URL(link)
        base = self.client.base_url
        if url.is_absolute_url and (url.host, url.port) != (base.host, base.port):
            raise PermanentError("Dataverse returned a paging link to another host; refusing to follow it")
        return url.raw_path.decode("ascii")

    def absolute(self, local: str) -> str:
        """Turn a stored path-and-query back into a URL on the configured host."""
        return str(self.client.base_url.copy_with(raw_path=local.encode("ascii")))

    def _observe(self, response: httpx.Response) -> None:
        values = response.headers.get_list("Date")
        if not values:
            return
        try:
            stamp = parsedate_to_datetime(values[0])
        except (TypeError, ValueError, IndexError):
            return
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        self._server_time = (stamp, self.clock())

    def server_now(self) -> datetime:
        """Dataverse's current time: its last ``Date`` header plus the time elapsed here since.

        Asks ``WhoAmI`` once when no response has been seen yet. Whole seconds, rounded down.
        """
        if self._server_time is None:
            self.get_json(self.path("WhoAmI"))
        if self._server_time is None:
            raise PermanentError("Dataverse sends no Date header; cannot bound a poll by server time")
        stamp, seen_at = self._server_time
        elapsed = max(self.clock() - seen_at, timedelta(0))
        return (stamp + elapsed).replace(microsecond=0)

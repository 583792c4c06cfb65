"""HubSpot's HTTP surface as the connector uses it: object config, calls, pacing, error mapping.

``HubSpotApi.call`` sends one request with bearer auth and classifies failures the HubSpot
way (shared/reference/api-contracts.md §2.4, §5): a 429 carries ``policyName`` and rarely a
``Retry-After``, so the wait comes from the policy (``SECONDLY`` search: 1 s;
``TEN_SECONDLY_ROLLING``: what is left of our own 10-second window; ``DAILY``: the next UTC
midnight); 423 and 477 are waits too. Search calls are paced client-side, because search
responses carry no rate-limit headers to steer by. ``HubSpotOAuth`` is the refresh-token
grant (``/oauth/v1/token``) that ``connectors.auth`` does not ship.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from agent.errors import AuthError, RateLimited, SyncAgentError
from agent.model import utcnow
from connectors.auth import Secret
from connectors.http import (
    HttpStatusFailure,
    classify_http,
    dump_json,
    json_body,
    parse_retry_after,
    raise_for_status,
)

logger = logging.getLogger(__name__)

BURST_WINDOW_S = 10.0
SEARCH_PAGE_MAX = 200
BATCH_MAX = 100
LIST_PAGE_MAX = 100


@dataclass(frozen=True, slots=True)
class HsObject:
    """One HubSpot object type to sync: its properties, upsert key and change-cursor property.

    ``id_property`` is a unique-value property (e.g. ``erp_id``) used as the upsert
    ``idProperty``; contacts need ``modified_property="lastmodifieddate"``.
    ``associations=("companies",)`` adds ``associated_company_id`` to each change.
    """

    name: str
    fields: tuple[str, ...]
    id_property: str | None = None
    modified_property: str = "hs_lastmodifieddate"
    associations: tuple[str, ...] = ()

    @property
    def properties(self) -> tuple[str, ...]:
        """Every property a read requests: the fields, the id property and the modified one."""
        extra = [p for p in (self.id_property, self.modified_property) if p]
        return tuple(dict.fromkeys([*self.fields, *extra]))


class HubSpotApi:
    """Calls HubSpot through one ``httpx.Client``: auth per request, search pacing, error classes."""

    def __init__(
        self,
        client: httpx.Client,
        auth: httpx.Auth,
        *,
        clock: Callable[[], datetime] = utcnow,
        search_rate_per_s: float = 4.0,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if search_rate_per_s <= 0:
            raise ValueError("search_rate_per_s must be positive")
        self.client = client
        self.clock = clock
        self._auth = auth
        self._interval = 1.0 / search_rate_per_s
        self._monotonic = monotonic
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_search = 0.0
        self._recent: deque[float] = deque(maxlen=1000)
        self.requests = 0

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str | int] | None = None,
        search: bool = False,
        tolerate: Sequence[int] = (),
    ) -> httpx.Response:
        """Send one request; statuses in ``tolerate`` come back, other failures raise classified."""
        if search:
            self._pace()
        else:
            self._recent.append(self._monotonic())
        content = dump_json(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        with classify_http(rules=lambda f: self._classify(f, search), clock=self.clock):
            response = self.client.request(
                method, path, content=content, params=params, headers=headers, auth=self._auth
            )
            self.requests += 1
            if response.status_code not in tolerate:
                raise_for_status(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Like ``call`` and return the parsed body (numbers with fractions as Decimal)."""
        return json_body(self.call(method, path, **kwargs))

    def server_time(self, response: httpx.Response) -> datetime:
        """The server's clock from the ``Date`` header (our clock when it is missing or bad)."""
        raw = response.headers.get("date")
        if raw:
            try:
                moment = parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                moment = None
            if moment is not None:
                return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        return self.clock()

    def _pace(self) -> None:
        with self._lock:
            now = self._monotonic()
            start = max(now, self._next_search)
            self._next_search = start + self._interval
        if start > now:
            self._sleep(start - now)

    def _classify(self, failure: HttpStatusFailure, search: bool) -> SyncAgentError | None:
        status, message = failure.status, str(failure)
        retry_after = parse_retry_after(failure.response.headers.get("Retry-After"), now=self.clock())
        if status == 429:
            body = failure.json()
            policy = str(body.get("policyName", "")) if isinstance(body, dict) else ""
            logger.warning("event=hubspot_rate_limited policy=%s search=%s", policy or "-", search)
            if policy == "DAILY":
                now = self.clock()
                midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
                return RateLimited(f"{message} policy DAILY", (midnight - now).total_seconds())
            if search or policy == "SECONDLY":
                return RateLimited(f"{message} policy {policy or 'SECONDLY'}", retry_after or 1.0)
            return RateLimited(f"{message} policy {policy or 'unknown'}", retry_after or self._burst_left())
        if status == 423:  # record locked by a concurrent write: wait at least 2 s
            return RateLimited(message, retry_after or 2.0)
        if status == 477:  # account migration in progress
            return RateLimited(message, retry_after or 60.0)
        return None

    def _burst_left(self) -> float:
        """Seconds until the oldest of our calls in the rolling 10-second window drops out."""
        now = self._monotonic()
        inside = [t for t in self._recent if now - t < BURST_WINDOW_S]
        return max(1.0, BURST_WINDOW_S - (now - inside[0])) if inside else BURST_WINDOW_S


class HubSpotOAuth:
    """``TokenProvider`` for a HubSpot OAuth app: the refresh-token grant, 30-minute tokens.

    Fetches ahead of expiry (``margin``) and again after ``invalidate()`` (a 401). A refused
    refresh token raises ``AuthError``; the token endpoint's 5xx and 429 are retryable.
    """

    def __init__(
        self,
        client: httpx.Client,
        client_id: str,
        client_secret: Secret,
        refresh_token: Secret,
        *,
        token_url: str = "/oauth/v1/token",
        clock: Callable[[], datetime] = utcnow,
        margin: timedelta = timedelta(seconds=60),
    ) -> None:
        self._client = client
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_token = refresh_token
        self._token_url = token_url
        self._clock = clock
        self._margin = margin
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at: datetime | None = None
        self.fetches = 0

    def token(self) -> str:
        """Return the cached access token, refreshing it when absent or about to expire."""
        with self._lock:
            if self._token is None or self._refresh_at is None or self._clock() >= self._refresh_at:
                self._token = self._fetch()
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token so the next ``token()`` refreshes."""
        with self._lock:
            self._token = None

    def _fetch(self) -> str:
        issued = self._clock()
        form = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "client_secret": self._client_secret.reveal(),
            "refresh_token": self._refresh_token.reveal(),
        }
        with classify_http(rules=_token_rule, clock=self._clock):
            response = raise_for_status(self._client.post(self._token_url, data=form, auth=httpx.Auth()))
        body = json_body(response)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise AuthError(f"token endpoint {self._token_url} answered without an access_token")
        self.fetches += 1
        if isinstance(body.get("refresh_token"), str):  # HubSpot may rotate it
            self._refresh_token = Secret(body["refresh_token"])
        lifetime = timedelta(seconds=float(body.get("expires_in") or 1800))
        self._refresh_at = issued + max(lifetime - self._margin, timedelta(0))
        logger.info("event=hubspot_token_refreshed expires_in=%s", int(lifetime.total_seconds()))
        return str(body["access_token"])


def _token_rule(failure: HttpStatusFailure) -> SyncAgentError | None:
    if 400 <= failure.status < 500 and failure.status != 429:
        body = failure.json()
        code = body.get("status") if isinstance(body, dict) else None
        return AuthError(f"token endpoint {failure.url} refused the refresh: {code or failure.status}")
    return None

"""Shared HTTP plumbing of the API connectors: client factory, error classification, Retry-After.

Usage::

    from connectors.http import make_client, classify_http, raise_for_status, json_body

    client = make_client("https://acme.my.salesforce.com", timeout=30.0)
    with classify_http():                       # httpx errors and bad statuses -> agent.errors
        response = raise_for_status(client.get("/services/data/", auth=my_auth))
    payload = json_body(response)               # JSON with Decimal numbers
    client.post(url, content=dump_json(body), headers={"Content-Type": "application/json"})

``raise_for_status`` raises ``HttpStatusFailure`` for any status >= 400; ``classify_http``
turns it (and httpx transport errors) into ``RetryableError``/``RateLimited``/``AuthError``/
``PermanentError``, raised ``from`` the original. A vendor passes ``rules=`` to classify its
own codes first (e.g. Salesforce's 403 ``REQUEST_LIMIT_EXCEEDED`` is a rate limit, not auth);
a rule returns an error to raise, or None to fall back to the generic table. Messages name
the method, the redacted URL, the status and the vendor error code, never bodies with values.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from agent.errors import AuthError, PermanentError, RateLimited, RetryableError, SyncAgentError
from agent.model import utcnow

logger = logging.getLogger(__name__)

StatusRule = Callable[["HttpStatusFailure"], SyncAgentError | None]

_START_KEY = "syncagent.started"
_RETRYABLE_TRANSPORT = (
    httpx.TimeoutException,
    httpx.ConnectError,
    httpx.RemoteProtocolError,
    httpx.NetworkError,
    httpx.ProxyError,
)


class HttpStatusFailure(Exception):
    """A response with status >= 400, before classification (carries the response)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.method = response.request.method
        self.url = redact_url(str(response.request.url))
        self.error_code = vendor_error_code(response)
        code = f" {self.error_code}" if self.error_code else ""
        super().__init__(f"{self.method} {self.url} answered {self.status}{code}")

    def json(self) -> Any:
        """The response body parsed as JSON (None when it is not JSON)."""
        try:
            return json_body(self.response)
        except ValueError:
            return None


def make_client(
    base_url: str,
    *,
    timeout: float = 30.0,
    verify: bool = True,
    transport: httpx.BaseTransport | None = None,
    user_agent: str | None = None,
) -> httpx.Client:
    """Build an ``httpx.Client`` with timeouts, a user agent and one log line per request."""
    return httpx.Client(
        base_url=base_url,
        timeout=httpx.Timeout(timeout),
        verify=verify,
        transport=transport,
        headers={"User-Agent": user_agent or _default_user_agent(), "Accept": "application/json"},
        event_hooks={"request": [_mark_start], "response": [_log_response]},
    )


def _default_user_agent() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"syncagent/{version('syncagent')}"
    except PackageNotFoundError:
        return "syncagent/dev"


def _mark_start(request: httpx.Request) -> None:
    request.extensions[_START_KEY] = time.monotonic()


def _log_response(response: httpx.Response) -> None:
    request = response.request
    started = request.extensions.get(_START_KEY)
    ms = int((time.monotonic() - started) * 1000) if isinstance(started, float) else -1
    logger.debug(
        "event=http_request method=%s url=%s status=%s ms=%s",
        request.method,
        redact_url(str(request.url)),
        response.status_code,
        ms,
    )


def raise_for_status(response: httpx.Response) -> httpx.Response:
    """Return ``response`` when its status is below 400, else raise ``HttpStatusFailure``."""
    if response.status_code >= 400:
        response.read()
        raise HttpStatusFailure(response)
    return response


def dump_json(value: Any) -> bytes:
    """Encode a request body as JSON: Decimals as exact numbers, dates and datetimes as ISO text."""
    return _encode(value).encode()


def _encode(value: Any) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("JSON cannot carry a non-finite number")
        return str(value)
    if isinstance(value, datetime | date):
        return json.dumps(value.isoformat())
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return json.dumps(value, allow_nan=False)


def json_body(response: httpx.Response) -> Any:
    """Parse a response body as JSON, numbers with fractions as ``Decimal`` (never float)."""
    content = response.read()
    if not content:
        return None
    return json.loads(content, parse_float=Decimal)


@contextmanager
def classify_http(
    *, rules: StatusRule | None = None, clock: Callable[[], datetime] = utcnow
) -> Iterator[None]:
    """Translate httpx errors and ``HttpStatusFailure`` into the agent's error tree.

    Timeouts, connect/protocol/network errors and 5xx are retryable; 429 is ``RateLimited``
    with the server's Retry-After; 401/403 are ``AuthError`` (the auth flow has already
    refreshed once); other 4xx are permanent. ``rules`` sees a status failure first.
    """
    try:
        yield
    except HttpStatusFailure as exc:
        raise _classify_status(exc, rules, clock) from exc
    except httpx.HTTPStatusError as exc:
        failure = HttpStatusFailure(exc.response)
        raise _classify_status(failure, rules, clock) from exc
    except _RETRYABLE_TRANSPORT as exc:
        raise RetryableError(f"{_describe(exc)}: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        raise PermanentError(f"{_describe(exc)}: {type(exc).__name__}") from exc


def _describe(exc: httpx.HTTPError) -> str:
    try:
        request = exc.request
    except RuntimeError:
        return "HTTP request"
    return f"{request.method} {redact_url(str(request.url))}"


def _classify_status(
    failure: HttpStatusFailure, rules: StatusRule | None, clock: Callable[[], datetime]
) -> SyncAgentError:
    if rules is not None:
        chosen = rules(failure)
        if chosen is not None:
            return chosen
    status, message = failure.status, str(failure)
    if status == 429:
        retry_after = parse_retry_after(failure.response.headers.get("Retry-After"), now=clock())
        return RateLimited(message, retry_after=retry_after)
    if status >= 500:
        return RetryableError(message)
    if status in (401, 403):
        return AuthError(message)
    return PermanentError(message)


def vendor_error_code(response: httpx.Response) -> str | None:
    """Pick the vendor's error code out of an error body, whatever CRM shaped it."""
    try:
        body = json.loads(response.content or b"null")
    except ValueError:
        return None
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]  # Salesforce: [{"message", "errorCode"}]
    if not isinstance(body, dict):
        return None
    for key in ("errorCode", "category", "code"):  # Salesforce, HubSpot, generic
        if isinstance(body.get(key), str):
            return str(body[key])
    error = body.get("error")
    if isinstance(error, str):  # OAuth token endpoints
        return error
    if isinstance(error, dict) and isinstance(error.get("code"), str):  # Dataverse
        return str(error["code"])
    details = body.get("o:errorDetails")  # NetSuite
    if isinstance(details, list) and details and isinstance(details[0], dict):
        code = details[0].get("o:errorCode")
        return code if isinstance(code, str) else None
    return None


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # reject NaN
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def redact_url(url: str | httpx.URL) -> str:
    """Return ``url`` with every query value (and any userinfo) replaced by ``***``."""
    parts = urlsplit(str(url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***") for k, _ in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

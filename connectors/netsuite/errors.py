"""NetSuite error bodies and their place in the agent's error tree.

NetSuite answers errors as ``{type, title, status, "o:errorDetails": [{detail, "o:errorCode",
"o:errorPath"?}]}``. The account-wide concurrency limit shows as 429, or as 400/403 with
``SSS_REQUEST_LIMIT_EXCEEDED`` / ``CONCURRENCY_LIMIT_EXCEEDED``, and never carries Retry-After:
the caller backs off by its own hint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from agent.errors import RateLimited, SyncAgentError
from agent.model import utcnow
from connectors.http import HttpStatusFailure, StatusRule, parse_retry_after

THROTTLE_CODES = frozenset(
    {
        "SSS_REQUEST_LIMIT_EXCEEDED",
        "CONCURRENCY_LIMIT_EXCEEDED",
        "WS_CONCUR_SESSION_DISALLWD",
        "WS_REQUEST_BLOCKED",
    }
)


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One entry of ``o:errorDetails``: code, human text, and the field it names (if any)."""

    code: str
    detail: str
    path: str | None = None


def error_details(response: httpx.Response) -> list[ErrorDetail]:
    """Return the ``o:errorDetails`` entries of an error response (empty when absent)."""
    try:
        body = json.loads(response.read() or b"null")
    except ValueError:
        return []
    items = body.get("o:errorDetails") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        if isinstance(item, dict):
            path = item.get("o:errorPath")
            out.append(
                ErrorDetail(
                    str(item.get("o:errorCode") or "UNKNOWN"),
                    str(item.get("detail") or ""),
                    path if isinstance(path, str) else None,
                )
            )
    return out


def is_throttled(response: httpx.Response) -> bool:
    """Tell whether a response is NetSuite's concurrency governance pushing back."""
    if response.status_code == 429:
        return True
    if response.status_code in (400, 403):
        return any(d.code in THROTTLE_CODES for d in error_details(response))
    return False


def throttle_wait(response: httpx.Response, hint: float) -> float:
    """Seconds to wait after a throttle: Retry-After if a proxy added one, else ``hint``."""
    waited = parse_retry_after(response.headers.get("Retry-After"), now=utcnow())
    return hint if waited is None else waited


def status_rule(hint: float) -> StatusRule:
    """Return a ``classify_http`` rule making throttles ``RateLimited`` with a backoff hint."""

    def rule(failure: HttpStatusFailure) -> SyncAgentError | None:
        if is_throttled(failure.response):
            return RateLimited(str(failure), retry_after=throttle_wait(failure.response, hint))
        return None

    return rule

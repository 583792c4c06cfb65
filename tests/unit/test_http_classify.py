"""Shared HTTP plumbing: classify_http, Retry-After, URL redaction, request logging, JSON, paginators."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime

import httpx
import pytest

from agent.errors import AuthError, PermanentError, RateLimited, RetryableError
from connectors.http import (
    HttpStatusFailure,
    classify_http,
    dump_json,
    json_body,
    make_client,
    parse_retry_after,
    raise_for_status,
    redact_url,
    vendor_error_code,
)
from connectors.paging import after_cursor_pages, follow_next_link, offset_pages

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def client_for(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return make_client("https://crm.example.test", transport=httpx.MockTransport(handler))


def answer(status: int, body: object = None, headers: dict[str, str] | None = None) -> httpx.Client:
    return client_for(lambda request: httpx.Response(status, json=body, headers=headers))


def raising(exc_type: type[httpx.TransportError]) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("boom", request=request)

    return client_for(handler)


@pytest.mark.parametrize(
    "exc_type",
    [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError],
)
def test_classify_http_raises_retryable_when_transport_fails(exc_type: type[httpx.TransportError]) -> None:
    client = raising(exc_type)
    with pytest.raises(RetryableError) as info, classify_http():
        client.get("/services/data/v62.0/query", params={"q": "SELECT Name FROM Account"})
    assert isinstance(info.value.__cause__, exc_type)
    assert "GET https://crm.example.test/services/data/v62.0/query?q=***" in str(info.value)
    assert "SELECT" not in str(info.value)


@pytest.mark.parametrize(
    ("status", "expected", "not_expected"),
    [
        (500, RetryableError, RateLimited),
        (502, RetryableError, RateLimited),
        (503, RetryableError, RateLimited),
        (429, RateLimited, type(None)),
        (401, AuthError, type(None)),
        (403, AuthError, type(None)),
        (400, PermanentError, AuthError),
        (404, PermanentError, AuthError),
        (409, PermanentError, AuthError),
        (422, PermanentError, AuthError),
    ],
)
def test_classify_http_maps_status_when_response_fails(
    status: int, expected: type[Exception], not_expected: type[Exception]
) -> None:
    client = answer(status, [{"message": "Name: Acme GmbH is taken", "errorCode": "SOME_CODE"}])
    with pytest.raises(expected) as info, classify_http(clock=lambda: NOW):
        raise_for_status(client.get("/x"))
    assert not isinstance(info.value, not_expected)
    assert isinstance(info.value.__cause__, HttpStatusFailure)
    assert f"answered {status} SOME_CODE" in str(info.value)
    assert "Acme" not in str(info.value)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0), (None, None)],
)
def test_classify_http_carries_retry_after_when_429(header: str | None, seconds: float | None) -> None:
    client = answer(429, {"status": "error"}, {"Retry-After": header} if header else None)
    with pytest.raises(RateLimited) as info, classify_http(clock=lambda: NOW):
        raise_for_status(client.get("/x"))
    assert info.value.retry_after == seconds


def test_classify_http_prefers_vendor_rule_when_it_matches() -> None:
    client = answer(
        403, [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    )

    def rule(failure: HttpStatusFailure) -> RateLimited | None:
        return RateLimited(str(failure)) if failure.error_code == "REQUEST_LIMIT_EXCEEDED" else None

    with pytest.raises(RateLimited), classify_http(rules=rule):
        raise_for_status(client.get("/x"))
    with pytest.raises(AuthError), classify_http(rules=rule):
        raise_for_status(answer(403, [{"errorCode": "INSUFFICIENT_ACCESS"}]).get("/x"))


def test_classify_http_also_maps_httpx_status_errors_when_raise_for_status_is_httpx() -> None:
    with pytest.raises(RetryableError), classify_http():
        answer(503).get("/x").raise_for_status()


def test_classify_http_passes_through_when_nothing_fails() -> None:
    with classify_http():
        response = raise_for_status(answer(200, {"ok": True}).get("/x"))
    assert json_body(response) == {"ok": True}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        (" 2.5 ", 2.5),
        (format_datetime(NOW + timedelta(minutes=2), usegmt=True), 120.0),
        (format_datetime(NOW - timedelta(minutes=2), usegmt=True), 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
    ],
)
def test_parse_retry_after_reads_seconds_or_dates_when_given(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h.test/a?q=SELECT+Name&x=1", "https://h.test/a?q=***&x=***"),
        ("https://user:pw@h.test/a", "https://***@h.test/a"),
        ("https://h.test/a/b", "https://h.test/a/b"),
        ("https://h.test/a?flag", "https://h.test/a?flag=***"),
    ],
)
def test_redact_url_hides_query_values_when_present(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_make_client_logs_one_line_per_request_when_debug(caplog: pytest.LogCaptureFixture) -> None:
    client = answer(200, {"ok": True})
    with caplog.at_level(logging.DEBUG, logger="connectors.http"):
        client.get(
            "/query", params={"q": "SELECT Secret__c FROM Account"}, headers={"Authorization": "Bearer t0k"}
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "connectors.http"]
    assert len(lines) == 1
    assert lines[0].startswith(
        "event=http_request method=GET url=https://crm.example.test/query?q=*** status=200 ms="
    )
    assert "t0k" not in lines[0] and "Secret__c" not in lines[0]


def test_make_client_sets_user_agent_when_none_given() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["User-Agent"])
        return httpx.Response(204)

    client_for(handler).get("/x")
    assert seen[0].startswith("syncagent/")


def test_dump_json_keeps_decimals_exact_when_encoding() -> None:
    body = {
        "Amount": Decimal("48000.10"),
        "Big": Decimal("12345678901234567890.123"),
        "d": NOW,
        "n": [1, None],
    }
    text = dump_json(body).decode()
    assert '"Amount":48000.10' in text and '"Big":12345678901234567890.123' in text
    assert '"d":"2024-05-01T12:00:00+00:00"' in text
    with pytest.raises(ValueError):
        dump_json({"x": Decimal("NaN")})


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([{"message": "m", "errorCode": "INVALID_SESSION_ID"}], "INVALID_SESSION_ID"),
        ({"status": "error", "category": "RATE_LIMITS"}, "RATE_LIMITS"),
        ({"error": "invalid_grant", "error_description": "d"}, "invalid_grant"),
        ({"error": {"code": "0x80072322", "message": "m"}}, "0x80072322"),
        ({"o:errorDetails": [{"detail": "d", "o:errorCode": "INVALID_LOGIN"}]}, "INVALID_LOGIN"),
        ("plain", None),
    ],
)
def test_vendor_error_code_finds_code_when_body_is_vendor_shaped(body: object, code: str | None) -> None:
    response = answer(400, body).get("/x")
    assert vendor_error_code(response) == code


# --- paginators ---------------------------------------------------------------------------


def linked_pages(n: int, *, absolute: bool = False) -> tuple[httpx.Client, list[str]]:
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(request.url.path)
        i = int(request.url.path.rsplit("-", 1)[1])
        body: dict[str, object] = {"records": [{"n": Decimal(i) + Decimal("0.5")}]}
        if i + 1 < n:
            link = f"/services/data/v62.0/query/01gX-{i + 1}"
            body["nextRecordsUrl"] = f"https://crm.example.test{link}" if absolute else link
        return httpx.Response(200, content=dump_json(body))

    return client_for(handler), fetched


@pytest.mark.parametrize("absolute", [False, True])
def test_follow_next_link_fetches_lazily_when_iterated(absolute: bool) -> None:
    client, fetched = linked_pages(3, absolute=absolute)
    first = client.get("/services/data/v62.0/query/01gX-0")
    pages = follow_next_link(client, first)
    assert next(pages)["records"] == [{"n": Decimal("0.5")}]
    assert len(fetched) == 1
    rest = list(pages)
    assert [p["records"][0]["n"] for p in rest] == [Decimal("1.5"), Decimal("2.5")]
    assert fetched == [f"/services/data/v62.0/query/01gX-{i}" for i in range(3)]


def test_follow_next_link_uses_given_fetcher_when_passed() -> None:
    calls: list[str] = []

    def get(url: str) -> dict[str, object]:
        calls.append(url)
        return {"value": [2]}

    first = {"value": [1], "@odata.nextLink": "https://org.example.test/api/data/v9.2/accounts?$skiptoken=x"}
    pages = list(
        follow_next_link(answer(200), first, next_key="@odata.nextLink", records_key="value", get=get)
    )
    assert [p["value"] for p in pages] == [[1], [2]]
    assert calls == ["https://org.example.test/api/data/v9.2/accounts?$skiptoken=x"]


def test_follow_next_link_raises_permanent_when_link_repeats() -> None:
    page = {"records": [], "nextRecordsUrl": "/again"}
    with pytest.raises(PermanentError):
        list(follow_next_link(answer(200), page, get=lambda url: page))


def test_follow_next_link_raises_retryable_when_next_page_fails() -> None:
    client = answer(503)
    with pytest.raises(RetryableError):
        list(follow_next_link(client, {"records": [], "nextRecordsUrl": "/next"}))


def test_after_cursor_pages_follows_after_until_absent_when_paging_stops() -> None:
    seen: list[str | None] = []

    def fetch(after: str | None) -> dict[str, object]:
        seen.append(after)
        n = 0 if after is None else int(after)
        return {"results": [n], "paging": {"next": {"after": str(n + 100)}}} if n < 200 else {"results": [n]}

    pages: Iterator[object] = after_cursor_pages(fetch)
    assert [p["results"] for p in pages] == [[0], [100], [200]]  # type: ignore[index]
    assert seen == [None, "100", "200"]


def test_after_cursor_pages_raises_permanent_when_cursor_repeats() -> None:
    with pytest.raises(PermanentError):
        list(after_cursor_pages(lambda after: {"paging": {"next": {"after": "5"}}}))


def test_offset_pages_steps_by_page_size_while_has_more() -> None:
    offsets: list[int] = []

    def fetch(offset: int) -> dict[str, object]:
        offsets.append(offset)
        return {"items": [], "hasMore": offset < 2000}

    assert len(list(offset_pages(fetch, page_size=1000))) == 3
    assert offsets == [0, 1000, 2000]

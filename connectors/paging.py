"""Generic paginators the CRM connectors share; each page is fetched only when asked for.

Usage::

    from connectors.paging import after_cursor_pages, follow_next_link, offset_pages

    # Salesforce / Dataverse: the first page is in hand, later ones are behind a link
    for page in follow_next_link(client, first_page, next_key="nextRecordsUrl",
                                 records_key="records", get=fetch_json):
        ...
    # HubSpot: fetch(after) -> page; follows page["paging"]["next"]["after"]
    for page in after_cursor_pages(lambda after: search(after)):
        ...
    # NetSuite SuiteQL: fetch(offset) -> page; follows page["hasMore"]
    for page in offset_pages(lambda offset: suiteql(offset), page_size=1000):
        ...

Pages are yielded as parsed dicts (the first one included). A link, cursor or offset that
repeats raises ``PermanentError`` instead of looping forever. Continuation tokens are in-walk
state only: never store them as a cursor (they expire); restart from the watermark instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx

from agent.errors import PermanentError
from connectors.http import classify_http, json_body, raise_for_status

Page = Mapping[str, Any]


def follow_next_link(
    client: httpx.Client,
    first: Page | httpx.Response,
    *,
    next_key: str = "nextRecordsUrl",
    records_key: str = "records",
    auth: httpx.Auth | None = None,
    headers: Mapping[str, str] | None = None,
    get: Callable[[str], Page] | None = None,
) -> Iterator[Page]:
    """Yield ``first`` and every page behind its ``next_key`` links, one fetch per page.

    A host-relative link (Salesforce's ``/services/data/...``) is resolved against the
    client's base URL origin; an absolute one (``@odata.nextLink``) is used as is. Pass
    ``get`` to fetch links yourself (to count API calls or add headers); otherwise
    ``client.get(link, auth=auth, headers=headers)`` is used, classified by ``classify_http``.
    """
    fetch = get or (lambda link: _get_json(client, link, auth=auth, headers=headers))
    page = json_body(first) if isinstance(first, httpx.Response) else first
    seen: set[str] = set()
    while True:
        _check_page(page, records_key)
        yield page
        link = page.get(next_key)
        if not link:
            return
        if not isinstance(link, str) or link in seen:
            raise PermanentError(f"pagination link under {next_key!r} repeats or is not a string")
        seen.add(link)
        page = fetch(resolve_link(client, link))


def resolve_link(client: httpx.Client, link: str) -> str:
    """Turn a next link into a URL the client can GET (host-relative links join the origin)."""
    if link.startswith("/") and client.base_url.host:
        return str(client.base_url.join(link))
    return link


def after_cursor_pages(fetch: Callable[[str | None], Page]) -> Iterator[Page]:
    """Yield pages from ``fetch(after)``, starting with None, following ``paging.next.after``."""
    after: str | None = None
    seen: set[str] = set()
    while True:
        page = fetch(after)
        yield page
        paging = page.get("paging") or {}
        nxt = paging.get("next") or {} if isinstance(paging, Mapping) else {}
        raw = nxt.get("after") if isinstance(nxt, Mapping) else None
        if raw is None or raw == "":
            return
        after = str(raw)
        if after in seen:
            raise PermanentError("pagination cursor 'after' repeats")
        seen.add(after)


def offset_pages(fetch: Callable[[int], Page], *, page_size: int, start: int = 0) -> Iterator[Page]:
    """Yield pages from ``fetch(offset)``, stepping by ``page_size`` while ``hasMore`` is true."""
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    offset = start
    while True:
        page = fetch(offset)
        yield page
        if not page.get("hasMore"):
            return
        offset += page_size


def _get_json(
    client: httpx.Client, url: str, *, auth: httpx.Auth | None, headers: Mapping[str, str] | None
) -> Page:
    with classify_http():
        chosen = auth if auth is not None else httpx.USE_CLIENT_DEFAULT
        response = raise_for_status(client.get(url, auth=chosen, headers=dict(headers or {})))
    body = json_body(response)
    if not isinstance(body, Mapping):
        raise PermanentError(f"page at {response.request.url.path} is not a JSON object")
    return body


def _check_page(page: Any, records_key: str) -> None:
    if not isinstance(page, Mapping):
        raise PermanentError("a page is not a JSON object")
    records = page.get(records_key, [])
    if not isinstance(records, list):
        raise PermanentError(f"page field {records_key!r} is not a list")

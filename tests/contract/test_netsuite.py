"""Contract tests: the NetSuite connector against its emulator, served over loopback HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from agent.errors import AuthError, CursorUnavailable, RateLimited, RetryableError
from agent.model import Batch, Change, Cursor, Op, Secret, utcnow
from connectors.auth import BearerAuth, encode_jwt, hs256_signer
from connectors.emulator import EmulatorServer
from connectors.http import make_client
from connectors.netsuite import NetSuiteConnector, NetSuiteM2M, NsDeletes, standard_records
from connectors.netsuite.emulator import SUITEQL_PATH, TOKEN_PATH, NetSuiteEmulator, ns_error

SECRET = "ns-contract-secret"
DATA = Path(__file__).resolve().parent.parent / "data" / "netsuite"
HOUR_AGO = utcnow().replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
def emu() -> NetSuiteEmulator:
    return NetSuiteEmulator(assertion_secret=SECRET)


@pytest.fixture
def server(emu: NetSuiteEmulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emu) as running:
        yield running


@pytest.fixture
def client(server: EmulatorServer) -> Iterator[httpx.Client]:
    with make_client(server.url, timeout=5.0) as c:
        yield c


def tokens_for(client: httpx.Client, secret: str = SECRET, **kw: Any) -> NetSuiteM2M:
    options: dict[str, Any] = {
        "client_id": "syncagent-client",
        "certificate_id": "syncagent-cert",
        "algorithm": "HS256",
        **kw,
    }
    return NetSuiteM2M(client, signer=hs256_signer(Secret(secret)), **options)


def connector(client: httpx.Client, tokens: NetSuiteM2M | None = None, **kw: Any) -> NetSuiteConnector:
    auth = BearerAuth(tokens or tokens_for(client))
    return NetSuiteConnector("netsuite", client, auth=auth, records=standard_records(), **kw)


def customers(emu: NetSuiteEmulator, n: int, *, at: Callable[[int], datetime]) -> list[str]:
    return [
        emu.insert(
            "customer", {"companyname": f"Co {i}", "subsidiary": "1", "externalid": f"C-{i}"}, modified=at(i)
        )
        for i in range(n)
    ]


def read_all(
    conn: NetSuiteConnector, stream: str, cursor: Cursor | None = None, *, limit: int = 1000
) -> tuple[list[Change], Cursor]:
    changes: list[Change] = []
    for _ in range(200):
        batch: Batch = conn.read(stream, cursor, limit=limit)
        changes += batch.changes
        cursor = batch.next_cursor
        if not batch.more:
            return changes, cursor
    raise AssertionError("the walk never finished")


def suiteql_requests(emu: NetSuiteEmulator) -> list[tuple[int, int]]:
    return [
        (int(r.query["offset"][0]), r.status) for r in emu.requests(method="POST", path_prefix=SUITEQL_PATH)
    ]


def upsert(eid: str, **fields: Any) -> Op:
    return Op(
        f"k-{eid}",
        "netsuite",
        "customer",
        f"cid-{eid}",
        "customer",
        "upsert",
        {"externalid": eid},
        fields,
        trace_id="t" + eid,
    )


# --- capture ---------------------------------------------------------------------------


def test_read_captures_every_tied_row_in_id_order_when_rows_share_one_second(emu, client):
    """Rows with the same lastmodifieddate come out ordered by id, none lost across small batches."""
    ids = customers(emu, 7, at=lambda i: HOUR_AGO)
    conn = connector(client)
    first = conn.read("customer", None, limit=3)
    assert first.more and [c.key["id"] for c in first.changes] == ids[:3]
    assert first.next_cursor.data["walk"]["id"] == ids[2]
    changes, cursor = read_all(conn, "customer", first.next_cursor, limit=3)
    assert [c.key["id"] for c in [*first.changes, *changes]] == ids
    assert cursor.data == {"v": 1, "ts": HOUR_AGO.strftime("%Y-%m-%dT%H:%M:%SZ"), "id": ids[-1]}
    assert all(c.source_ts == HOUR_AGO and c.op == "update" for c in changes)


def test_read_pages_by_offset_across_page_boundaries_when_rows_exceed_the_page(emu, client):
    """A walk larger than page_size follows hasMore with offsets and returns each row once."""
    ids = customers(emu, 25, at=lambda i: HOUR_AGO + timedelta(seconds=i))
    changes, _ = read_all(connector(client, page_size=10), "customer")
    assert [c.key["id"] for c in changes] == ids
    offsets = [offset for offset, status in suiteql_requests(emu)]
    assert 10 in offsets and all(status == 200 for _, status in suiteql_requests(emu))


def test_read_splits_the_walk_into_new_queries_when_it_nears_the_query_cap():
    """With a 30-row cap, 95 rows are read through several queries, none lost or repeated."""
    emu = NetSuiteEmulator(assertion_secret=SECRET, query_cap=30)
    with EmulatorServer(emu) as srv, make_client(srv.url, timeout=5.0) as c:
        ids = customers(emu, 95, at=lambda i: HOUR_AGO + timedelta(seconds=i // 4))
        changes, _ = read_all(connector(c, page_size=10, query_cap=30), "customer")
        assert [ch.key["id"] for ch in changes] == ids
        offsets = [offset for offset, _ in suiteql_requests(emu)]
        assert max(offsets) < 30 and offsets.count(0) >= 4


def test_read_requeries_from_the_last_row_when_the_server_cap_is_lower_than_configured():
    """A cap error past the first page restarts from the last row instead of failing or skipping."""
    emu = NetSuiteEmulator(assertion_secret=SECRET, query_cap=30)
    with EmulatorServer(emu) as srv, make_client(srv.url, timeout=5.0) as c:
        ids = customers(emu, 70, at=lambda i: HOUR_AGO + timedelta(seconds=i))
        changes, _ = read_all(connector(c, page_size=10), "customer")
        assert [ch.key["id"] for ch in changes] == ids
        assert (30, 400) in suiteql_requests(emu)


@pytest.mark.parametrize(
    ("display_zone", "display_format", "sql_zone"),
    [
        ("Pacific/Kiritimati", "%d.%m.%Y", "UTC"),
        ("America/Los_Angeles", "%m/%d/%Y %I:%M %p", "UTC"),
        ("Asia/Tokyo", "%Y/%m/%d", "Europe/Berlin"),
    ],
)
def test_read_returns_exact_utc_stamps_when_the_user_display_format_and_zone_differ(
    display_zone, display_format, sql_zone
):
    """Stamps survive any user date preference; TO_CHAR/TO_DATE read in the configured query zone."""
    emu = NetSuiteEmulator(
        assertion_secret=SECRET,
        display_zone=ZoneInfo(display_zone),
        display_datetime=display_format,
        sql_zone=ZoneInfo(sql_zone),
    )
    stamp = datetime(2024, 10, 27, 0, 59, 58, tzinfo=UTC)  # near a DST change in Europe
    rid = emu.insert("customer", {"companyname": "Tz Co", "externalid": "TZ-1"}, modified=stamp)
    with EmulatorServer(emu) as srv, make_client(srv.url, timeout=5.0) as c:
        tokens = tokens_for(c)
        changes, cursor = read_all(connector(c, tokens, query_zone=ZoneInfo(sql_zone)), "customer")
        raw = c.post(
            SUITEQL_PATH,
            params={"limit": 1},
            headers={"Prefer": "transient"},
            json={"q": "SELECT id, lastmodifieddate FROM customer"},
            auth=BearerAuth(tokens),
        )
    assert [(ch.key["id"], ch.source_ts, ch.version) for ch in changes] == [
        (rid, stamp, "2024-10-27T00:59:58Z")
    ]
    assert cursor.data["ts"] == "2024-10-27T00:59:58Z"
    shown = raw.json()["items"][0]["lastmodifieddate"]
    assert shown == stamp.astimezone(ZoneInfo(display_zone)).strftime(display_format)


def test_read_emits_delete_changes_when_records_are_deleted(emu, client):
    """The deleted-records stream turns each deletion into op "delete" keyed by the internal id."""
    keep, gone = customers(emu, 2, at=lambda i: HOUR_AGO)
    inv = emu.insert("invoice", {"entity": keep, "tranid": "INV-1", "externalid": "INV-1"}, modified=HOUR_AGO)
    emu.delete("customer", gone, at=HOUR_AGO + timedelta(minutes=1))
    emu.delete("invoice", inv, at=HOUR_AGO + timedelta(minutes=2))
    conn = connector(client)
    deleted, _ = read_all(conn, "customer:deleted")
    assert [(c.op, c.key, c.object_name, c.fields["externalid"]) for c in deleted] == [
        ("delete", {"id": gone}, "customer", "C-1")
    ]
    updates, _ = read_all(conn, "customer")
    assert [c.key["id"] for c in updates] == [keep]
    assert deleted[0].position not in {c.position for c in updates}


def test_read_keeps_positions_distinct_when_ids_coincide_across_record_types(emu, client):
    """A customer and an invoice with the same internal id never share a journal position."""
    cust = emu.insert("customer", {"companyname": "Same Id"}, modified=HOUR_AGO)
    inv = emu.insert("invoice", {"entity": cust, "tranid": "INV-9"}, modified=HOUR_AGO)
    assert cust == inv
    conn = connector(client)
    (c,), _ = read_all(conn, "customer")
    (i,), _ = read_all(conn, "invoice")
    assert c.position != i.position and i.fields["entity"] == cust


def test_read_rereads_the_lookback_window_when_polling_again(emu, client):
    """A new poll starts 15 minutes before the watermark; re-read rows keep their positions."""
    now = utcnow().replace(microsecond=0)
    customers(emu, 1, at=lambda i: now - timedelta(hours=2))
    recent = customers(emu, 2, at=lambda i: now - timedelta(minutes=5 - i))
    conn = connector(client)
    first, cursor = read_all(conn, "customer")
    again, _ = read_all(conn, "customer", cursor)
    assert len(first) == 3
    assert [c.key["id"] for c in again] == recent
    assert {c.position for c in again} <= {c.position for c in first}


def test_read_requeries_from_the_last_row_when_rows_leave_the_result_set_mid_walk(server, emu):
    """A row edited between pages shifts offsets; the walk notices and loses nothing."""
    ids = customers(emu, 30, at=lambda i: HOUR_AGO + timedelta(seconds=i))
    pages = {"n": 0}

    def edit_after_second_page(response: httpx.Response) -> None:
        if response.request.url.path == SUITEQL_PATH:
            pages["n"] += 1
            if pages["n"] == 2:  # ids[10:20] were just served: move ids[15] past the signpost
                emu.update(
                    "customer", ids[15], {"companyname": "edited"}, modified=utcnow() + timedelta(hours=1)
                )

    with httpx.Client(
        base_url=server.url, timeout=5.0, event_hooks={"response": [edit_after_second_page]}
    ) as c:
        changes, _ = read_all(connector(c, page_size=10), "customer")
    assert [ch.key["id"] for ch in changes] == ids


def test_read_resumes_from_a_stored_cursor_when_the_connector_restarts(emu, server):
    """A cursor stored as JSON mid-walk lets a new connector continue with nothing lost or repeated."""
    ids = customers(emu, 9, at=lambda i: HOUR_AGO + timedelta(seconds=i))
    with make_client(server.url) as c1:
        batch = connector(c1).read("customer", None, limit=4)
    stored = json.loads(json.dumps(dict(batch.next_cursor.data)))
    later = emu.insert("customer", {"companyname": "Late"}, modified=utcnow() - timedelta(seconds=5))
    with make_client(server.url) as c2:
        rest, cursor = read_all(connector(c2), "customer", Cursor(stored), limit=4)
        fresh, _ = read_all(connector(c2), "customer", cursor)
    assert [c.key["id"] for c in [*batch.changes, *rest]] == [*ids, later]  # later sits under the signpost
    assert [c.key["id"] for c in fresh] == [later]  # the next poll's look-back re-reads it


def test_read_refuses_the_cursor_when_its_version_is_unknown(client):
    """A cursor of another format version is a CursorUnavailable, not a silent full re-read."""
    with pytest.raises(CursorUnavailable):
        connector(client).read("customer", Cursor({"v": 9, "ts": "x"}), limit=10)


# --- writes ----------------------------------------------------------------------------


def test_apply_upserts_by_external_id_idempotently_when_replayed(emu, client):
    """PUT eid: creates once; the replay updates the same record and returns the Location id."""
    conn = connector(client)
    op = upsert("C-500", companyname="Acme", subsidiary="1", currency="2")
    (first,) = conn.apply([op])
    (second,) = conn.apply([op])
    assert first.status == second.status == "applied" and first.external_id == second.external_id
    rows = [r for r in emu.all("customer") if r.get("externalid") == "C-500"]
    assert len(rows) == 1 and str(rows[0]["id"]) == first.external_id
    assert rows[0]["subsidiary"] == "1" and rows[0]["companyname"] == "Acme"
    puts = emu.requests(method="PUT")
    assert [r.path for r in puts] == ["/services/rest/record/v1/customer/eid:C-500"] * 2


def test_apply_patches_by_internal_id_when_the_key_holds_it(emu, client):
    """An op keyed by the internal id is a PATCH of that record."""
    (rid,) = customers(emu, 1, at=lambda i: HOUR_AGO)
    op = Op(
        "k", "netsuite", "customer", "c", "customer", "upsert", {"id": rid}, {"companyname": "Renamed"}, "t"
    )
    assert connector(client).apply([op])[0].external_id == rid
    assert emu.get("customer", rid)["companyname"] == "Renamed"
    assert [r.path for r in emu.requests(method="PATCH")] == [f"/services/rest/record/v1/customer/{rid}"]


def test_apply_deletes_by_external_id_when_the_record_exists_or_is_already_gone(emu, client):
    """DELETE answers 204 the first time and 404 the second; both are applied."""
    customers(emu, 1, at=lambda i: HOUR_AGO)
    op = Op("k", "netsuite", "customer", "c", "customer", "delete", {"externalid": "C-0"}, {}, "t")
    conn = connector(client)
    assert [o.status for o in conn.apply([op, op])] == ["applied", "applied"]
    assert emu.all("customer") == []


@pytest.mark.parametrize(
    ("setup", "bad", "field_name"),
    [
        (lambda e: e.require("customer", "subsidiary"), {"companyname": "No Sub"}, "subsidiary"),
        (lambda e: e.require("customer", "companyname"), {"subsidiary": "1"}, "companyname"),
        (
            lambda e: e.allow("customer", "currency", ("1", "2")),
            {"companyname": "X", "currency": "99"},
            "currency",
        ),
        (lambda e: None, {"companyname": "X", "nosuchfield": "x"}, "nosuchfield"),
    ],
)
def test_apply_rejects_only_the_bad_record_with_its_field_when_validation_fails(
    emu, client, setup, bad, field_name
):
    """A 400 with o:errorDetails rejects that op, naming the SuiteQL column; the others apply."""
    setup(emu)
    good = {"companyname": "Fine", "subsidiary": "1", "currency": "1"}
    outcomes = connector(client).apply([upsert("C-1", **good), upsert("C-2", **bad), upsert("C-3", **good)])
    assert [o.status for o in outcomes] == ["applied", "reject", "applied"]
    assert outcomes[1].field_name == field_name and outcomes[1].reason in ("USER_ERROR", "INVALID_CONTENT")
    assert {r["externalid"] for r in emu.all("customer")} == {"C-1", "C-3"}


@pytest.mark.parametrize(
    "throttle",
    [
        ns_error(429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded."),
        ns_error(400, "SSS_REQUEST_LIMIT_EXCEEDED", "Request limit exceeded."),
        ns_error(403, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded."),
    ],
)
def test_apply_retries_the_rest_with_a_backoff_hint_when_the_concurrency_limit_answers(emu, client, throttle):
    """A throttle on op 2 keeps op 1 applied and returns op 2 and 3 as retry, sending nothing more."""
    conn = connector(client, throttle_backoff=7.5)
    conn.apply([upsert("C-1", companyname="A")])
    emu.inject(throttle, method="PUT")
    outcomes = conn.apply([upsert("C-2", companyname="B"), upsert("C-3", companyname="C")])
    assert [(o.status, o.retry_after) for o in outcomes] == [("retry", 7.5), ("retry", 7.5)]
    assert len(emu.requests(method="PUT")) == 2


def test_read_raises_rate_limited_when_the_account_concurrency_limit_is_exceeded():
    """A second simultaneous request beyond the limit gets 429, surfaced as RateLimited with a hint."""
    emu = NetSuiteEmulator(assertion_secret=SECRET, concurrency_limit=1)
    with EmulatorServer(emu) as srv, make_client(srv.url, timeout=5.0) as c:
        tokens = tokens_for(c)
        conn = connector(c, tokens, throttle_backoff=3.0)
        emu.inject(delay=0.3, path_prefix="/services/rest/record")
        holder = threading.Thread(
            target=lambda: c.get("/services/rest/record/v1/customer", auth=BearerAuth(tokens))
        )
        tokens.token()
        holder.start()
        deadline = time.monotonic() + 2
        while emu.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(RateLimited) as caught:
            conn.read("customer", None, limit=10)
        holder.join()
    assert caught.value.retry_after == 3.0
    assert (0, 429) in suiteql_requests(emu)


def test_read_and_apply_treat_server_errors_as_retryable_when_netsuite_answers_5xx(emu, client):
    """5xx on a query raises RetryableError (not a rate limit); on a write it is a retry outcome."""
    conn = connector(client)
    emu.inject(ns_error(503, "UNEXPECTED_ERROR", "Service unavailable."), path_prefix=SUITEQL_PATH)
    with pytest.raises(RetryableError) as caught:
        conn.read("customer", None, limit=10)
    assert not isinstance(caught.value, RateLimited)
    emu.inject(ns_error(500, "UNEXPECTED_ERROR", "An unexpected error occurred."), method="PUT")
    assert [o.status for o in conn.apply([upsert("C-1", companyname="A")])] == ["retry"]
    assert [o.status for o in conn.apply([upsert("C-1", companyname="A")])] == ["applied"]


# --- auth ------------------------------------------------------------------------------


def test_auth_runs_the_grant_once_more_when_a_token_is_rejected(emu, client):
    """After the server forgets the token, one 401 triggers one new grant and the read succeeds."""
    tokens = tokens_for(client)
    conn = connector(client, tokens)
    customers(emu, 1, at=lambda i: HOUR_AGO)
    read_all(conn, "customer")
    emu.expire_tokens()
    changes, _ = read_all(conn, "customer")
    assert len(changes) == 1 and tokens.fetches == 2 and len(emu.grants()) == 2
    assert [r.status for r in emu.requests(path_prefix=SUITEQL_PATH)].count(401) == 1


def test_auth_raises_auth_error_when_the_token_is_refused_after_a_refresh(emu, client):
    """Two 401s in a row (INVALID_LOGIN) end in AuthError, after exactly one refresh."""
    tokens = tokens_for(client)
    conn = connector(client, tokens)
    body = json.loads((DATA / "error_login_401.json").read_text())
    emu.inject(
        ns_error(401, "INVALID_LOGIN", body["o:errorDetails"][0]["detail"]), count=2, path_prefix=SUITEQL_PATH
    )
    with pytest.raises(AuthError):
        conn.read("customer", None, limit=10)
    assert tokens.fetches == 2


def test_auth_runs_the_grant_ahead_of_expiry_when_the_hour_is_nearly_over(client):
    """No 401 needed: within the margin before the hour ends, token() runs the grant again."""
    now = {"t": utcnow() - timedelta(minutes=57)}
    tokens = tokens_for(client, clock=lambda: now["t"], assertion_lifetime=timedelta(hours=1))
    first = tokens.token()
    now["t"] += timedelta(minutes=50)
    assert tokens.token() == first and tokens.fetches == 1
    now["t"] += timedelta(minutes=7)
    assert tokens.token() != first and tokens.fetches == 2


def test_emulator_accepts_the_assertion_when_it_is_signed_and_addressed_correctly(emu, client):
    """The verified JWT carries kid, alg, iss, aud = token URL, scope, and exp within the hour."""
    tokens_for(client).token()
    (grant,) = emu.grants()
    assert grant["header"] == {"alg": "HS256", "kid": "syncagent-cert", "typ": "JWT"}
    claims = grant["claims"]
    assert claims["iss"] == "syncagent-client" and claims["scope"] == ["rest_webservices"]
    assert claims["aud"] == str(client.base_url.join(TOKEN_PATH))
    assert 0 < claims["exp"] - claims["iat"] <= 3600


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": "wrong"}, "signature"),
        ({"algorithm": "RS256"}, "alg"),
        ({"certificate_id": "other-cert"}, "kid"),
        ({"client_id": "someone-else"}, "iss"),
        ({"token_path": TOKEN_PATH + "?x=1"}, "aud"),
    ],
)
def test_emulator_refuses_the_assertion_when_one_claim_is_wrong(emu, client, change, reason):
    """Each broken part of the assertion is refused; the connector sees AuthError."""
    with pytest.raises(AuthError):
        tokens_for(client, **change).token()
    assert emu.refusals() == [reason]


def test_emulator_refuses_the_assertion_when_it_lives_longer_than_an_hour(emu, client):
    """exp more than 3600 s after iat is refused."""
    iat = int(time.time())
    claims = {
        "iss": "syncagent-client",
        "scope": ["rest_webservices"],
        "iat": iat,
        "exp": iat + 7200,
        "aud": str(client.base_url.join(TOKEN_PATH)),
    }
    jwt = encode_jwt(
        {"alg": "HS256", "kid": "syncagent-cert", "typ": "JWT"}, claims, hs256_signer(Secret(SECRET))
    )
    response = client.post(
        TOKEN_PATH,
        data={
            "grant_type": "client_credentials",
            "client_assertion": jwt,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        },
    )
    assert response.status_code == 400 and emu.refusals() == ["exp"]


# --- check and emulator fidelity -------------------------------------------------------


def test_check_reports_nothing_when_every_table_and_record_type_is_reachable(emu, client):
    """A healthy account yields no problems."""
    emu.seed_demo()
    assert connector(client).check() == []


def test_check_reports_credentials_when_the_assertion_is_refused(client):
    """A wrong key shows as one credentials problem, not one per stream."""
    (problem,) = connector(client, tokens_for(client, secret="wrong")).check()
    assert problem.subject == "netsuite: credentials" and problem.severity == "error"


def test_check_warns_about_deletes_when_the_deleted_records_table_is_missing(client):
    """An account without the deleted-records table gets warnings for the delete streams only."""
    problems = connector(client, deletes=NsDeletes(table="nosuchtable")).check()
    assert {p.subject for p in problems} == {f"netsuite.{n}:deleted" for n in standard_records()}
    assert {p.severity for p in problems} == {"warning"}


def test_emulator_matches_the_documented_shapes_when_answering_queries_and_errors(emu, client):
    """Pages and error bodies carry the keys of the documented samples; ids are strings, nulls omitted."""
    emu.seed_demo()
    auth = BearerAuth(tokens_for(client))
    page = client.post(
        SUITEQL_PATH,
        params={"limit": 1},
        headers={"Prefer": "transient"},
        auth=auth,
        json={
            "q": "SELECT id, email, TO_CHAR(lastmodifieddate, 'YYYY-MM-DD\"T\"HH24:MI:SS') "
            "AS lastmodifieddate FROM customer ORDER BY id"
        },
    ).json()
    sample = json.loads((DATA / "suiteql_page.json").read_text())
    assert set(page) == set(sample) and {link["rel"] for link in page["links"]} >= {"next", "self"}
    item = page["items"][0]
    assert isinstance(item["id"], str) and "email" not in item and item["links"] == []
    datetime.strptime(item["lastmodifieddate"], "%Y-%m-%dT%H:%M:%S")
    error = client.put(
        "/services/rest/record/v1/job/eid:J-1", json={"parent": {"id": "999"}}, auth=auth
    ).json()
    expected = json.loads((DATA / "error_user_400.json").read_text())
    assert set(error) == set(expected) and set(error["o:errorDetails"][0]) == set(
        expected["o:errorDetails"][0]
    )
    assert error["o:errorDetails"][0]["o:errorPath"] == "parent"


@pytest.mark.parametrize(
    ("params", "headers", "code"),
    [
        ({"limit": 10}, {}, "INVALID_PARAMETER"),
        ({"limit": 1001}, {"Prefer": "transient"}, "INVALID_PARAMETER"),
        ({"limit": 10, "offset": 5}, {"Prefer": "transient"}, "INVALID_PARAMETER"),
    ],
)
def test_emulator_rejects_suiteql_when_paging_or_prefer_header_break_the_rules(client, params, headers, code):
    """Missing Prefer: transient, limit over 1000 and an offset not a multiple of limit answer 400."""
    auth = BearerAuth(tokens_for(client))
    response = client.post(
        SUITEQL_PATH, params=params, headers=headers, auth=auth, json={"q": "SELECT id FROM customer"}
    )
    assert response.status_code == 400
    assert response.json()["o:errorDetails"][0]["o:errorCode"] == code


def test_emulator_token_and_throttle_bodies_match_the_documented_shapes_when_compared(client):
    """The token response and the 429 body carry the documented keys (expires_in is a string)."""
    tokens = tokens_for(client)
    form = {
        "grant_type": "client_credentials",
        "client_assertion": tokens.assertion(),
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
    }
    token = client.post(TOKEN_PATH, data=form).json()
    sample = json.loads((DATA / "token_response.json").read_text())
    assert set(token) == set(sample) and token["expires_in"] == "3600"
    throttle = ns_error(429, "CONCURRENCY_LIMIT_EXCEEDED", "Concurrent request limit exceeded.").body
    expected = json.loads((DATA / "error_concurrency_429.json").read_text())
    assert {k: throttle[k] for k in ("type", "title", "status")} == {
        k: expected[k] for k in ("type", "title", "status")
    }


def test_package_exports_exactly_its_public_names_when_imported():
    """connectors.netsuite re-exports the connector, the token provider and the record specs."""
    import connectors.netsuite as package

    assert sorted(package.__all__) == [
        "NetSuiteConnector",
        "NetSuiteM2M",
        "NsDeletes",
        "NsRecord",
        "standard_records",
    ]

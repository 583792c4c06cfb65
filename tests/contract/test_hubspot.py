"""HubSpotConnector against the HubSpot emulator running as a real loopback server."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import AuthError, CursorUnavailable, RateLimited, RetryableError
from agent.model import Batch, Change, Cursor, Op, utcnow
from connectors.auth import BearerAuth, Secret, StaticToken
from connectors.base import Sink, Source
from connectors.emulator import EmulatorServer
from connectors.http import make_client
from connectors.hubspot import HsObject, HubSpotConnector, HubSpotEmulator, HubSpotOAuth
from connectors.hubspot.sink import property_errors, reject_outcome

TOKEN = "pat-na1-emulator"
DATA = Path(__file__).resolve().parents[1] / "data" / "hubspot"
DEALS = HsObject("deals", ("dealname", "amount", "dealstage"), "erp_id")
COMPANIES = HsObject("companies", ("name", "domain"), "erp_id")
CONTACTS = HsObject("contacts", ("email", "firstname"), "erp_id", modified_property="lastmodifieddate")
OBJECTS = {"deals": DEALS, "companies": COMPANIES, "contacts": CONTACTS}

Start = Callable[..., tuple[HubSpotEmulator, str]]


@pytest.fixture
def hubspot() -> Iterator[Start]:
    """Start emulators (with knobs) as loopback servers; stop them after the test."""
    servers: list[EmulatorServer] = []

    def start(**knobs: Any) -> tuple[HubSpotEmulator, str]:
        knobs.setdefault("search_rate_per_s", 1000)
        emu = HubSpotEmulator(**knobs)
        servers.append(EmulatorServer(emu).start())
        return emu, servers[-1].url

    yield start
    for server in servers:
        server.stop()


def connect(url: str, *, auth: httpx.Auth | None = None, **kw: Any) -> HubSpotConnector:
    kw.setdefault("search_rate_per_s", 500.0)
    kw.setdefault("safety_lag", timedelta(0))
    kw.setdefault("objects", OBJECTS)
    return HubSpotConnector(
        "hubspot", make_client(url, timeout=5.0), auth=auth or BearerAuth(StaticToken(Secret(TOKEN))), **kw
    )


def ago(**delta: float) -> datetime:
    return utcnow() - timedelta(**delta)


def drain(
    hub: HubSpotConnector, stream: str, cursor: Cursor | None, limit: int = 1000
) -> tuple[list[Change], Cursor]:
    changes: list[Change] = []
    for _ in range(200):
        batch: Batch = hub.read(stream, cursor, limit=limit)
        changes.extend(batch.changes)
        cursor = batch.next_cursor
        if not batch.more:
            return changes, cursor
    raise AssertionError("the walk never finished")


def deal(emu: HubSpotEmulator, n: int, at: datetime, **props: str) -> str:
    return emu.insert("deals", {"dealname": f"D{n}", "amount": f"{n}.50", "erp_id": f"D-{n}", **props}, at=at)


# --- capture ------------------------------------------------------------------------------------


def test_read_captures_changes_after_cursor_when_records_change(hubspot: Start) -> None:
    """A first read returns every record; the next poll only what changed since (plus look-back)."""
    emu, url = hubspot()
    ids = [deal(emu, n, ago(minutes=10) + timedelta(milliseconds=n)) for n in range(5)]
    hub = connect(url)
    first, cursor = drain(hub, "deals", None)
    assert [c.key["id"] for c in first] == ids
    change = first[0]
    assert change.op == "update" and change.fields["amount"] == Decimal("0.50")
    assert change.fields["dealname"] == "D0" and change.fields["erp_id"] == "D-0"
    assert change.position == f"{ids[0]}@{change.version}" and change.version.endswith("Z")
    assert change.source_ts is not None and change.source_ts.utcoffset() == timedelta(0)
    assert set(cursor.data) == {"v", "ts", "id"} and cursor.data["v"] == 1
    emu.update("deals", ids[3], {"dealstage": "closedwon"}, at=ago(seconds=30))
    second, _ = drain(hub, "deals", cursor)
    assert [(c.key["id"], c.fields["dealstage"]) for c in second] == [(ids[3], "closedwon")]


def test_read_keeps_ties_whole_when_equal_timestamps_cross_page_boundaries(
    hubspot: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Records sharing one millisecond, more than a page of them, are all read exactly once."""
    caplog.set_level(logging.INFO, logger="connectors.hubspot.source")
    emu, url = hubspot()
    base = ago(minutes=5)
    before = [deal(emu, n, base - timedelta(milliseconds=3 - n)) for n in range(3)]
    tied = [deal(emu, 10 + n, base) for n in range(12)]
    after = [deal(emu, 30 + n, base + timedelta(milliseconds=1)) for n in range(4)]
    hub = connect(url, page_size=5)
    for limit in (1000, 4):
        changes, _ = drain(hub, "deals", None, limit=limit)
        got = [c.key["id"] for c in changes]
        assert sorted(got, key=int) == sorted(before + tied + after, key=int)
        assert len(got) == len(set(got)), f"duplicates with limit {limit}"
    assert "event=hubspot_tie_walk" in caplog.text  # the 12-record tie outgrew a 5-record page


def test_read_splits_windows_when_a_query_would_pass_the_search_cap(hubspot: Start) -> None:
    """With a 50-result cap, 300 changes (60 in one millisecond) are read with no 400 and no loss."""
    emu, url = hubspot(search_cap=50)
    base = ago(minutes=5)
    ids = [deal(emu, n, base + timedelta(milliseconds=n // 3)) for n in range(240)]
    ids += [deal(emu, 1000 + n, base + timedelta(seconds=1)) for n in range(60)]
    hub = connect(url, page_size=20)
    changes, _ = drain(hub, "deals", None)
    assert sorted({c.key["id"] for c in changes}, key=int) == ids
    assert len(changes) == 300
    statuses = {r.status for r in emu.requests(path_prefix="/crm/v3/objects/deals/search")}
    assert statuses == {200}
    beyond = httpx.post(
        f"{url}/crm/v3/objects/deals/search",
        json={"after": "50"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert beyond.status_code == 400 and beyond.json()["category"] == "VALIDATION_ERROR"


def test_read_emits_deletes_when_records_are_archived(hubspot: Start) -> None:
    """Archived records (never in search) come from the archived list as op 'delete'."""
    emu, url = hubspot()
    keep, gone = deal(emu, 1, ago(minutes=10)), deal(emu, 2, ago(minutes=10))
    hub = connect(url)
    _, cursor = drain(hub, "deals", None)
    emu.archive("deals", gone, at=ago(seconds=20))
    changes, cursor = drain(hub, "deals", cursor)
    assert [(c.op, c.key["id"]) for c in changes] == [("delete", gone)]
    assert changes[0].position == f"{gone}@{changes[0].version}:archived"
    assert changes[0].fields["erp_id"] == "D-2"
    emu.archive("deals", deal(emu, 3, ago(minutes=30)), at=ago(minutes=30))
    later, _ = drain(hub, "deals", cursor)
    assert [(c.op, c.key["id"]) for c in later] == [("delete", gone)]  # look-back re-read only
    assert keep not in {c.key["id"] for c in later}


def test_read_repeats_positions_when_look_back_rereads_records(hubspot: Start) -> None:
    """Records inside the look-back come again with identical positions (the journal dedups)."""
    emu, url = hubspot()
    deal(emu, 1, ago(seconds=40))
    deal(emu, 2, ago(minutes=20))
    hub = connect(url)
    first, cursor = drain(hub, "deals", None)
    again, _ = drain(hub, "deals", cursor)
    assert len(first) == 2 and len(again) == 1
    assert again[0].position in {c.position for c in first}


def test_read_stops_at_signpost_when_records_are_newer_than_server_time(hubspot: Start) -> None:
    """Nothing after the server's Date minus the safety lag is read, and the cursor stays behind it."""
    emu, url = hubspot()
    old = deal(emu, 1, ago(minutes=3))
    deal(emu, 2, utcnow() + timedelta(minutes=5))
    hub = connect(url, safety_lag=timedelta(seconds=30))
    changes, cursor = drain(hub, "deals", None)
    assert [c.key["id"] for c in changes] == [old]
    stamp = datetime.fromisoformat(cursor.data["ts"].replace("Z", "+00:00"))
    assert stamp <= utcnow() - timedelta(seconds=29)


@pytest.mark.parametrize(("lookback", "found"), [(timedelta(seconds=120), True), (timedelta(0), False)])
def test_read_finds_late_indexed_records_when_look_back_covers_the_lag(
    hubspot: Start, lookback: timedelta, found: bool
) -> None:
    """A change searchable only after the poll passed it is caught by the look-back, not without it."""
    emu, url = hubspot(index_lag_ms=60_000)
    deal(emu, 1, ago(minutes=10))
    emu.settle_index()
    hub = connect(url, lookback=lookback)
    _, cursor = drain(hub, "deals", None)
    late = deal(emu, 2, ago(seconds=30))
    hidden, cursor = drain(hub, "deals", cursor)
    assert late not in {c.key["id"] for c in hidden}
    emu.settle_index()
    shown, _ = drain(hub, "deals", cursor)
    assert (late in {c.key["id"] for c in shown}) is found


def test_read_resumes_from_stored_cursor_when_connector_restarts(hubspot: Start) -> None:
    """A cursor stored as JSON mid-poll lets a new connector finish the walk with nothing lost."""
    emu, url = hubspot()
    base = ago(minutes=5)
    ids = [deal(emu, n, base + timedelta(milliseconds=n // 4)) for n in range(30)]
    first = connect(url, page_size=7).read("deals", None, limit=10)
    assert first.more and "until" in first.next_cursor.data
    stored = Cursor(json.loads(json.dumps(dict(first.next_cursor.data))))
    rest, _ = drain(connect(url, page_size=7), "deals", stored, limit=10)
    seen = [c.key["id"] for c in [*first.changes, *rest]]
    assert sorted(set(seen), key=int) == ids and len(seen) == len(ids)
    with pytest.raises(CursorUnavailable):
        connect(url).read("deals", Cursor({"v": 99}), limit=10)


def test_read_adds_associated_company_when_configured(hubspot: Start) -> None:
    """Deal changes carry associated_company_id (primary first); company_of agrees."""
    emu, url = hubspot()
    acme = emu.insert("companies", {"name": "Acme"}, at=ago(minutes=9))
    globex = emu.insert("companies", {"name": "Globex"}, at=ago(minutes=9))
    linked, lonely = deal(emu, 1, ago(minutes=8)), deal(emu, 2, ago(minutes=8))
    objects = {"deals": HsObject("deals", ("dealname",), "erp_id", associations=("companies",))}
    hub = connect(url, objects=objects)
    hub.associate(linked, acme)
    assert hub.company_of(linked) == acme and hub.company_of(lonely) is None
    emu.associate("deals", linked, "companies", globex, type_id=5)  # primary
    changes, _ = drain(hub, "deals", None)
    assert {c.key["id"]: c.fields["associated_company_id"] for c in changes} == {linked: globex, lonely: None}
    assert hub.company_of(linked) == globex


# --- apply --------------------------------------------------------------------------------------


def upsert(obj: str, key: dict[str, Any], **fields: Any) -> Op:
    ref = next(iter(key.values()))
    return Op(f"k-{obj}-{ref}", "hubspot", "contract", f"c-{ref}", obj, "upsert", key, fields, "t")


def test_apply_upserts_idempotently_when_run_twice(hubspot: Start) -> None:
    """Upserting by erp_id twice creates the records once and updates them the second time."""
    emu, url = hubspot()
    hub = connect(url)
    ops = [
        upsert("deals", {"erp_id": f"D-{n}"}, dealname=f"Deal {n}", amount=Decimal("1200.50"))
        for n in range(3)
    ]
    first = hub.apply(ops)
    second = hub.apply(ops)
    assert [o.status for o in first + second] == ["applied"] * 6
    assert [o.external_id for o in first] == [o.external_id for o in second]
    assert len(emu.all("deals")) == 3
    assert emu.get("deals", str(first[0].external_id))["properties"]["amount"] == "1200.50"
    by_id = hub.apply([upsert("deals", {"id": first[1].external_id}, dealstage="closedwon")])
    assert by_id[0].status == "applied" and len(emu.all("deals")) == 3
    assert emu.requests(path_prefix="/crm/v3/objects/deals/batch/update")


@pytest.mark.parametrize(
    ("obj", "bad", "reason", "status"),
    [
        ("deals", {"amount": "not-a-number"}, "VALIDATION_ERROR", 400),
        ("contacts", {"email": "taken@example.com"}, "CONFLICT", 409),
    ],
)
def test_apply_isolates_one_bad_record_when_hubspot_fails_the_whole_batch(
    hubspot: Start, obj: str, bad: dict[str, str], reason: str, status: int
) -> None:
    """One bad input in 100 fails the batch whole; bisection applies 99 and rejects only it."""
    emu, url = hubspot()
    emu.insert("contacts", {"email": "taken@example.com"})
    hub = connect(url)
    ops = [
        upsert(obj, {"erp_id": f"X-{n}"}, **({"email": f"p{n}@example.com"} if obj == "contacts" else {}))
        for n in range(100)
    ]
    ops[37] = upsert(obj, {"erp_id": "X-37"}, **bad)
    outcomes = hub.apply(ops)
    assert [n for n, o in enumerate(outcomes) if o.status != "applied"] == [37]
    assert outcomes[37].status == "reject" and outcomes[37].reason == reason
    detail = outcomes[37].detail or ""
    assert "taken@example.com" not in detail and "not-a-number" not in detail  # no field values
    calls = emu.requests(path_prefix=f"/crm/v3/objects/{obj}/batch/upsert")
    print(f"bisect requests for 1 bad in 100 ({obj}): {len(calls)}")
    assert calls[0].status == status and len(calls) <= 15
    assert len(emu.all(obj)) == 99 + (1 if obj == "contacts" else 0)


def test_apply_rejects_inputs_directly_when_a_property_does_not_exist_or_is_read_only(hubspot: Start) -> None:
    """Inputs setting an unknown or read-only property are rejected by name, without bisecting."""
    emu, url = hubspot()
    ops = [upsert("deals", {"erp_id": f"X-{n}"}, dealname=f"d{n}") for n in range(100)]
    for n in range(5):
        ops[n] = upsert("deals", {"erp_id": f"X-{n}"}, dealname="d", bogus="1")
        ops[50 + n] = upsert("deals", {"erp_id": f"X-{50 + n}"}, dealname="d", createdate="2026-01-01")
    outcomes = connect(url).apply(ops)
    rejected = {n: o.field_name for n, o in enumerate(outcomes) if o.status == "reject"}
    assert rejected == {**dict.fromkeys(range(5), "bogus"), **dict.fromkeys(range(50, 55), "createdate")}
    assert len(emu.all("deals")) == 90
    assert len(emu.requests(path_prefix="/crm/v3/objects/deals/batch/upsert")) == 2


@pytest.mark.parametrize(
    ("sample", "reason", "pairs"),
    [
        (
            "batch_400_invalid_properties.json",
            "VALIDATION_ERROR",
            [("PROPERTY_DOESNT_EXIST", "legacy_code"), ("INVALID_NUMBER", "amount")],
        ),
        ("batch_409_conflict.json", "CONFLICT", []),
    ],
)
def test_sink_parses_vendor_error_bodies_when_hubspot_refuses_a_batch(
    sample: str, reason: str, pairs: list[tuple[str, str]]
) -> None:
    """Real 400/409 shapes (details embedded in ``message``) yield codes and names, never values."""
    body = json.loads((DATA / sample).read_text())
    assert property_errors(body) == pairs
    outcome = reject_outcome(body)
    assert outcome.reason == reason
    assert "12,5" not in (outcome.detail or "") and "5512" not in (outcome.detail or "")


def test_apply_archives_records_when_ops_delete(hubspot: Start) -> None:
    """Deletes by id or by erp_id archive the record; a missing one counts as already deleted."""
    emu, url = hubspot()
    a, b = deal(emu, 1, ago(minutes=1)), deal(emu, 2, ago(minutes=1))
    hub = connect(url)
    ops = [
        Op("k1", "hubspot", "contract", "c1", "deals", "delete", {"id": a}, {}, "t"),
        Op("k2", "hubspot", "contract", "c2", "deals", "delete", {"erp_id": "D-2"}, {}, "t"),
        Op("k3", "hubspot", "contract", "c3", "deals", "delete", {"erp_id": "D-404"}, {}, "t"),
    ]
    outcomes = hub.apply(ops)
    assert [o.status for o in outcomes] == ["applied"] * 3 and outcomes[2].detail == "already deleted"
    assert {r["id"] for r in emu.all("deals", archived=True)} == {a, b}


# --- errors, limits, auth -----------------------------------------------------------------------


def test_read_paces_search_when_rate_is_limited_per_second(hubspot: Start) -> None:
    """Paced at 8/s against a 10/s limit, a 9-page walk sees no 429; an unpaced 20-page one is throttled."""
    for paced, rate, size in ((True, 8.0, 5), (False, 1000.0, 2)):
        emu, url = hubspot(search_rate_per_s=10)
        base = ago(minutes=5)
        for n in range(40):
            deal(emu, n, base + timedelta(milliseconds=n))
        hub = connect(url, page_size=size, search_rate_per_s=rate)
        started = time.monotonic()
        if paced:
            changes, _ = drain(hub, "deals", None)
            searches = emu.requests(path_prefix="/crm/v3/objects/deals/search")
            assert len(changes) == 40 and {r.status for r in searches} == {200}
            assert time.monotonic() - started >= (len(searches) - 1) / rate * 0.9
        else:
            with pytest.raises(RateLimited) as caught:
                drain(hub, "deals", None)
            assert caught.value.retry_after == 1.0  # search 429s carry no Retry-After


@pytest.mark.parametrize(
    ("policy", "header", "low", "high"),
    [
        ("TEN_SECONDLY_ROLLING", None, 1.0, 10.0),
        ("TEN_SECONDLY_ROLLING", 3, 3.0, 3.0),
        ("DAILY", None, 1.0, 86400.0),
    ],
)
def test_apply_raises_rate_limited_when_hubspot_answers_429(
    hubspot: Start, policy: str, header: int | None, low: float, high: float
) -> None:
    """A 429 maps to RateLimited with Retry-After when sent, else a wait from policyName."""
    emu, url = hubspot()
    emu.throttle_next(policy=policy, retry_after=header, path_prefix="/crm/v3/objects/deals/batch")
    with pytest.raises(RateLimited) as caught:
        connect(url).apply([upsert("deals", {"erp_id": "D-1"}, dealname="x")])
    assert caught.value.retry_after is not None and low <= caught.value.retry_after <= high


def test_read_raises_retryable_when_server_fails(hubspot: Start) -> None:
    """A 5xx (or a slow answer past the timeout) is a retryable batch failure."""
    emu, url = hubspot()
    emu.fail_next(503, path_prefix="/crm/v3/objects/deals")
    with pytest.raises(RetryableError):
        connect(url).read("deals", None, limit=10)


def test_read_refreshes_oauth_token_once_when_it_expired(hubspot: Start) -> None:
    """An expired OAuth token is refreshed once on the 401; a refused static token is AuthError."""
    emu, url = hubspot()
    deal(emu, 1, ago(minutes=5))
    client = make_client(url, timeout=5.0)
    provider = HubSpotOAuth(client, "emulator-client", Secret("emulator-secret"), Secret("emulator-refresh"))
    hub = connect(url, auth=BearerAuth(provider))
    assert len(drain(hub, "deals", None)[0]) == 1 and provider.fetches == 1
    emu.expire_all_tokens()
    emu.reset_log()
    assert len(drain(hub, "deals", None)[0]) == 1
    assert provider.fetches == 2 and len(emu.requests(path_prefix="/oauth/v1/token")) == 1
    assert [r.status for r in emu.requests()][:3] == [401, 200, 200]
    emu.tokens.clear()
    with pytest.raises(AuthError):
        connect(url).read("deals", None, limit=10)


def test_oauth_refreshes_ahead_of_expiry_when_token_is_about_to_lapse(hubspot: Start) -> None:
    """The provider renews a 30-minute token inside its margin, before any 401; bad secrets are AuthError."""
    _, url = hubspot()
    now = [utcnow()]
    client = make_client(url, timeout=5.0)
    provider = HubSpotOAuth(
        client, "emulator-client", Secret("emulator-secret"), Secret("emulator-refresh"), clock=lambda: now[0]
    )
    first = provider.token()
    now[0] += timedelta(minutes=28)
    assert provider.token() == first and provider.fetches == 1
    now[0] += timedelta(minutes=1, seconds=1)  # 29:01 of 30:00, inside the 60 s margin
    assert provider.token() != first and provider.fetches == 2
    with pytest.raises(AuthError, match="BAD_REFRESH_TOKEN"):
        HubSpotOAuth(client, "emulator-client", Secret("emulator-secret"), Secret("stale")).token()


def test_check_reports_problems_when_config_does_not_match_account(hubspot: Start) -> None:
    """check() is clean for a good config and names bad properties, keys and tokens."""
    emu, url = hubspot()
    assert connect(url).check() == []
    bad = {
        "deals": HsObject("deals", ("dealname", "nope"), "dealname"),
        "contacts": HsObject("contacts", ("email",), "erp_id"),
    }
    messages = [p.message for p in connect(url, objects=bad).check()]
    assert any("nope" in m for m in messages)
    assert any("dealname is not a unique-value property" in m for m in messages)
    assert any("lastmodifieddate" in m for m in messages)
    problems = connect(url, auth=BearerAuth(StaticToken(Secret("wrong")))).check()
    assert len(problems) == 3 and all("refused the token" in p.message for p in problems)


def test_connector_satisfies_source_and_sink_protocols(hubspot: Start) -> None:
    """HubSpotConnector is a Source and a Sink with one stream per object."""
    _, url = hubspot()
    hub = connect(url)
    assert isinstance(hub, Source) and isinstance(hub, Sink)
    assert list(hub.streams()) == ["deals", "companies", "contacts"]


# --- emulator fidelity ----------------------------------------------------------------------------


def test_emulator_forgets_archived_records_when_retention_passes(hubspot: Start) -> None:
    """Archived records show in archived=true lists only for the retention window."""
    emu, url = hubspot(archive_retention_days=1)
    recent, old = deal(emu, 1, ago(days=3)), deal(emu, 2, ago(days=3))
    emu.archive("deals", recent, at=ago(hours=2))
    emu.archive("deals", old, at=ago(days=2))
    changes, _ = drain(connect(url), "deals", None)
    assert [(c.op, c.key["id"]) for c in changes] == [("delete", recent)]


def test_emulator_enforces_search_rules_when_requests_break_them(hubspot: Start) -> None:
    """Two sorts, limit > 200 and unknown filter properties are 400; search has no rate headers."""
    emu, url = hubspot()
    emu.seed_demo()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    search = f"{url}/crm/v3/objects/0-3/search"
    two_sorts = {"sorts": [{"propertyName": "amount"}, {"propertyName": "dealname"}]}
    for body in (
        two_sorts,
        {"limit": 201},
        {"filterGroups": [{"filters": [{"propertyName": "bogus", "operator": "EQ", "value": "1"}]}]},
    ):
        answer = httpx.post(search, json=body, headers=auth)
        assert answer.status_code == 400 and {"message", "correlationId", "category"} <= set(answer.json())
    between = {"propertyName": "amount", "operator": "BETWEEN", "value": "9000", "highValue": "50000"}
    ok = httpx.post(search, json={"filterGroups": [{"filters": [between]}]}, headers=auth)
    assert ok.json()["total"] == 2 and not any(h.startswith("x-hubspot-ratelimit") for h in ok.headers)
    listed = httpx.get(f"{url}/crm/v3/objects/deals", headers=auth)
    assert listed.headers["x-hubspot-ratelimit-max"] == "100"
    dated = httpx.get(f"{url}/crm/objects/2026-03/0-3", headers=auth)  # date-versioned path, type id
    assert [r["id"] for r in dated.json()["results"]] == [r["id"] for r in listed.json()["results"]]
    denied = httpx.get(f"{url}/crm/v3/objects/deals")
    assert denied.status_code == 401 and denied.json()["category"] == "INVALID_AUTHENTICATION"

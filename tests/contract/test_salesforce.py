"""The Salesforce connector against its emulator, run as a real loopback server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agent.errors import AuthError, BudgetExhausted, PermanentError, RateLimited, RetryableError
from agent.model import Batch, Change, Cursor, Op, Secret
from connectors.auth import BearerAuth, ClientCredentials, JwtBearer, hs256_signer
from connectors.base import Sink, Source
from connectors.emulator import EmulatorServer
from connectors.http import make_client
from connectors.salesforce import ApiBudget, SalesforceConnector, SfObject, soql_quote
from connectors.salesforce.emulator import SalesforceEmulator

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
DATA = Path(__file__).resolve().parents[1] / "data" / "salesforce"
OBJECTS = {
    "Account": SfObject("Account", ("Name", "BillingCountry", "ERP_Id__c"), "ERP_Id__c"),
    "Opportunity": SfObject(
        "Opportunity", ("Name", "Amount", "StageName", "IsWon", "ERP_Id__c"), "ERP_Id__c"
    ),
}


@dataclass
class Org:
    """An emulator on a loopback port plus a way to build connectors against it."""

    emu: SalesforceEmulator
    url: str

    def connector(
        self,
        *,
        secret: str = "s3cret",
        lookback: timedelta = timedelta(minutes=1),
        budget: ApiBudget | None = None,
        clock: Callable[[], datetime] | None = None,
        objects: dict[str, SfObject] | None = None,
        api_version: str = "v62.0",
    ) -> SalesforceConnector:
        client = make_client(self.url, timeout=5.0)
        provider = ClientCredentials(client, "/services/oauth2/token", "syncagent", Secret(secret))
        extra = {"clock": clock} if clock else {}
        return SalesforceConnector(
            "sf",
            client,
            auth=BearerAuth(provider),
            api_version=api_version,
            objects=objects or OBJECTS,
            lookback=lookback,
            budget=budget,
            **extra,  # type: ignore[arg-type]
        )

    def data_requests(self) -> list[Any]:
        return self.emu.requests(path_prefix="/services/data/v")


@pytest.fixture
def org() -> Iterator[Org]:
    emu = SalesforceEmulator(page_size=3)
    emu.freeze_clock(T0)
    server = EmulatorServer(emu).start()
    yield Org(emu, server.url)
    # shutdown() waits out serve_forever's 0.5 s poll; nothing needs to wait for it here
    threading.Thread(target=server.stop, daemon=True).start()


def accounts(emu: SalesforceEmulator, n: int, *, at: datetime | None = None, start: int = 0) -> list[str]:
    return [
        emu.insert("Account", {"Name": f"Firm {i}", "ERP_Id__c": f"C-{i}"}, at=at)
        for i in range(start, start + n)
    ]


def drain(
    sf: SalesforceConnector, stream: str, cursor: Cursor | None, *, limit: int
) -> tuple[list[Change], Cursor]:
    changes: list[Change] = []
    for _ in range(100):
        batch = sf.read(stream, cursor, limit=limit)
        changes.extend(batch.changes)
        cursor = batch.next_cursor
        if not batch.more:
            return changes, cursor
    raise AssertionError("read never caught up")


def upsert(i: int, **fields: Any) -> Op:
    body = {"Name": f"Firm {i}", **fields}
    return Op(f"k{i}", "sf", "account", f"c{i}", "Account", "upsert", {"ERP_Id__c": f"C-{i}"}, body, f"t{i}")


# --- reads -------------------------------------------------------------------------------


def test_salesforce_connector_satisfies_source_and_sink_protocols(org: Org) -> None:
    """The one object is both a Source and a Sink, with one stream per configured object."""
    sf = org.connector()
    assert isinstance(sf, Source) and isinstance(sf, Sink)
    assert list(sf.streams()) == ["Account", "Opportunity"]


def test_read_returns_changes_after_cursor_when_records_are_added(org: Org) -> None:
    """A second poll returns what changed after the first, shaped as update changes."""
    first_ids = accounts(org.emu, 2)
    org.emu.shift_clock(timedelta(seconds=10))
    sf = org.connector(lookback=timedelta(0))
    batch = sf.read("Account", None, limit=100)
    assert [c.key["Id"] for c in batch.changes] == first_ids and not batch.more
    change = batch.changes[0]
    assert change.op == "update" and change.object_name == "Account" and change.source == "sf"
    assert change.fields == {"Name": "Firm 0", "BillingCountry": None, "ERP_Id__c": "C-0"}
    assert change.position.startswith(f"{first_ids[0]}@2024-05-01T12:00:00.000+0000#")
    assert change.version == "2024-05-01T12:00:00.000+0000" and change.source_ts == T0

    new_ids = accounts(org.emu, 2, start=2)
    org.emu.shift_clock(timedelta(seconds=10))
    second = sf.read("Account", batch.next_cursor, limit=100)
    assert [c.key["Id"] for c in second.changes] == new_ids


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7, 10, 50])
def test_read_loses_and_repeats_nothing_when_ties_straddle_pages(org: Org, limit: int) -> None:
    """Ten rows with one SystemModstamp, pages of 3, any batch limit: each row exactly once."""
    ids = accounts(org.emu, 10)
    org.emu.shift_clock(timedelta(seconds=10))
    changes, cursor = drain(org.connector(), "Account", None, limit=limit)
    assert [c.key["Id"] for c in changes] == sorted(ids)
    assert "upto" not in cursor.data


def test_read_sees_late_commit_when_inside_lookback(org: Org) -> None:
    """A row stamped before the last poll but visible only after it is caught by the look-back."""
    accounts(org.emu, 2)
    org.emu.shift_clock(timedelta(seconds=30))
    sf = org.connector(lookback=timedelta(minutes=1))
    _, cursor = drain(sf, "Account", None, limit=100)
    late = org.emu.insert("Account", {"Name": "Late"}, at=T0 + timedelta(seconds=5))
    org.emu.shift_clock(timedelta(seconds=10))
    changes, _ = drain(sf, "Account", cursor, limit=100)
    assert late in [c.key["Id"] for c in changes]


def test_read_repeats_positions_when_lookback_overlaps(org: Org) -> None:
    """Rows inside the look-back come again with identical positions (the journal dedups them)."""
    accounts(org.emu, 4)
    org.emu.shift_clock(timedelta(seconds=10))
    sf = org.connector(lookback=timedelta(minutes=5))
    first, cursor = drain(sf, "Account", None, limit=3)
    again, _ = drain(sf, "Account", cursor, limit=3)
    assert [c.position for c in again] == [c.position for c in first]


def test_read_gives_two_edits_within_one_modstamp_second_distinct_positions(org: Org) -> None:
    """SystemModstamp ticks in seconds: a second edit in the same second must not pass for a repeat."""
    [rid] = accounts(org.emu, 1)
    org.emu.shift_clock(timedelta(seconds=10))
    sf = org.connector(lookback=timedelta(minutes=5))
    _, cursor = drain(sf, "Account", None, limit=10)
    org.emu.update("Account", rid, {"Name": "Firm 0 Ltd"}, at=T0 + timedelta(seconds=5))
    ltd, cursor = drain(sf, "Account", cursor, limit=10)
    org.emu.update("Account", rid, {"Name": "Firm 0 Limited"}, at=T0 + timedelta(seconds=5, milliseconds=400))
    limited, _ = drain(sf, "Account", cursor, limit=10)
    [a] = [c for c in ltd if c.fields["Name"] == "Firm 0 Ltd"]
    [b] = [c for c in limited if c.fields["Name"] == "Firm 0 Limited"]
    assert a.version == b.version, "the emulator stamps both edits with one second"
    assert a.position != b.position


def test_read_reports_delete_when_record_is_soft_deleted(org: Org) -> None:
    """queryAll shows IsDeleted rows as delete changes keyed by Id; plain query does not."""
    ids = accounts(org.emu, 2)
    org.emu.shift_clock(timedelta(seconds=10))
    sf = org.connector(lookback=timedelta(0))
    _, cursor = drain(sf, "Account", None, limit=100)
    org.emu.delete("Account", ids[0])
    org.emu.shift_clock(timedelta(seconds=10))
    changes, _ = drain(sf, "Account", cursor, limit=100)
    assert [(c.op, c.key) for c in changes] == [("delete", {"Id": ids[0]})]
    assert changes[0].fields["Name"] == "Firm 0"

    live_only = {"Account": SfObject("Account", ("Name",), "ERP_Id__c", use_query_all=False)}
    plain, _ = drain(org.connector(objects=live_only), "Account", None, limit=100)
    assert [c.key["Id"] for c in plain] == [ids[1]]


def test_read_never_passes_signpost_when_rows_are_newer_than_server_time(org: Org) -> None:
    """Rows stamped after the server's Date (minus the safety lag) wait for a later poll."""
    old = accounts(org.emu, 3)
    org.emu.shift_clock(timedelta(seconds=10))  # server time T0+10 s, signpost T0+8 s
    future = [org.emu.insert("Account", {"Name": "Soon"}, at=T0 + timedelta(seconds=s)) for s in (9, 30)]
    sf = org.connector(lookback=timedelta(0))
    for limit in (1, 100):
        changes, cursor = drain(sf, "Account", None, limit=limit)
        assert [c.key["Id"] for c in changes] == old
        assert datetime.fromisoformat(cursor.data["ts"]) <= T0 + timedelta(seconds=8)
    org.emu.shift_clock(timedelta(minutes=1))
    later, _ = drain(sf, "Account", cursor, limit=100)
    assert [c.key["Id"] for c in later] == future


def test_read_resumes_from_stored_cursor_when_restarted(org: Org) -> None:
    """A cursor stored as JSON mid-walk lets a fresh connector continue without loss or repeats."""
    ids = accounts(org.emu, 8)
    org.emu.shift_clock(timedelta(seconds=10))
    batch = org.connector().read("Account", None, limit=3)
    assert batch.more and batch.next_cursor.data["upto"]
    stored = json.loads(json.dumps(dict(batch.next_cursor.data)))
    rest, _ = drain(org.connector(), "Account", Cursor(stored), limit=3)
    assert [c.key["Id"] for c in [*batch.changes, *rest]] == ids


def test_read_parses_numbers_as_decimal_when_fields_are_numeric(org: Org) -> None:
    """Currency values arrive as Decimal, never float."""
    org.emu.insert(
        "Opportunity",
        {"Name": "P", "StageName": "Closed Won", "Amount": Decimal("12500.50"), "CloseDate": "2024-06-30"},
    )
    org.emu.shift_clock(timedelta(seconds=10))
    batch = org.connector().read("Opportunity", None, limit=10)
    assert batch.changes[0].fields["Amount"] == Decimal("12500.5")
    assert isinstance(batch.changes[0].fields["Amount"], Decimal)
    assert batch.changes[0].fields["IsWon"] is True


def test_read_keeps_injection_literal_when_cursor_id_is_hostile(org: Org) -> None:
    """A cursor id full of SOQL is escaped: it filters as a string, it does not widen the query."""
    accounts(org.emu, 3)
    newer = accounts(org.emu, 2, at=T0 + timedelta(seconds=5), start=3)
    org.emu.shift_clock(timedelta(seconds=10))
    hostile = "zzz' OR Name != 'x"
    cursor = Cursor(
        {"v": 1, "ts": T0.isoformat(), "id": hostile, "upto": (T0 + timedelta(seconds=8)).isoformat()}
    )
    batch = org.connector().read("Account", cursor, limit=100)
    assert [c.key["Id"] for c in batch.changes] == newer
    soql = org.data_requests()[-1].query["q"][0]
    assert soql_quote(hostile) in soql and "Id > 'zzz\\' OR Name != \\'x'" in soql


def test_read_starts_at_configured_time_when_cursor_is_none(org: Org) -> None:
    """With start_at and no cursor, older rows are skipped and the look-back does not apply."""
    accounts(org.emu, 2)
    newer = accounts(org.emu, 1, at=T0 + timedelta(seconds=5), start=2)
    org.emu.shift_clock(timedelta(seconds=10))
    client = make_client(org.url)
    provider = ClientCredentials(client, "/services/oauth2/token", "syncagent", Secret("s3cret"))
    sf = SalesforceConnector(
        "sf", client, auth=BearerAuth(provider), objects=OBJECTS, start_at=T0 + timedelta(seconds=1)
    )
    assert [c.key["Id"] for c in sf.read("Account", None, limit=10).changes] == newer


def test_read_raises_permanent_when_cursor_is_unreadable(org: Org) -> None:
    """A cursor of another format version is refused rather than guessed at."""
    with pytest.raises(PermanentError):
        org.connector().read("Account", Cursor({"v": 99}), limit=10)


# --- writes ------------------------------------------------------------------------------


def test_apply_upserts_idempotently_when_replayed(org: Org) -> None:
    """First apply creates, a replay updates the same records and creates nothing twice."""
    sf = org.connector()
    ops = [upsert(i) for i in range(3)]
    first = sf.apply(ops)
    assert [o.status for o in first] == ["applied"] * 3 and {o.detail for o in first} == {"created"}
    again = sf.apply(ops)
    assert [o.external_id for o in again] == [o.external_id for o in first]
    assert {o.detail for o in again} == {"updated"}
    assert len(org.emu.all("Account")) == 3


@pytest.mark.parametrize(
    ("setup", "bad_fields", "reason", "field_name"),
    [
        (
            lambda emu: emu.schemas["Account"].require("BillingCountry"),
            {},
            "REQUIRED_FIELD_MISSING",
            "BillingCountry",
        ),
        (
            lambda emu: emu.schemas["Account"].restrict_picklist("Industry", ["Consulting", "Legal"]),
            {"Industry": "Mining"},
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "Industry",
        ),
        (lambda emu: None, {"NoSuchField__c": 1}, "INVALID_FIELD", "NoSuchField__c"),
        (
            lambda emu: emu.schemas["Account"].add_rule(
                lambda r: (
                    ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Name too short", ["Name"])
                    if r["Name"] == "X"
                    else None
                ),
            ),
            {"Name": "X"},
            "FIELD_CUSTOM_VALIDATION_EXCEPTION",
            "Name",
        ),
    ],
)
def test_apply_rejects_only_the_bad_record_when_7_of_50_fails(
    org: Org,
    setup: Callable[[SalesforceEmulator], None],
    bad_fields: dict[str, Any],
    reason: str,
    field_name: str,
) -> None:
    """Record 7 of 50 comes back rejected with the vendor's code and field; the other 49 apply."""
    setup(org.emu)
    ops = [upsert(i, BillingCountry="DE", Industry="Consulting") for i in range(50)]
    bad = dict(ops[6].fields, **bad_fields)
    if reason == "REQUIRED_FIELD_MISSING":
        bad.pop("BillingCountry")
    ops[6] = Op("k6", "sf", "account", "c6", "Account", "upsert", {"ERP_Id__c": "C-6"}, bad, "t6")
    outcomes = org.connector().apply(ops)
    assert [o.status for o in outcomes].count("applied") == 49
    assert outcomes[6].status == "reject" and outcomes[6].reason == reason
    assert outcomes[6].field_name == field_name
    assert len(org.emu.all("Account")) == 49


def test_apply_sends_200_records_per_request_when_given_450_ops(org: Org) -> None:
    """450 upserts travel in 3 Collections requests (200, 200, 50); outcomes stay in op order."""
    outcomes = org.connector().apply([upsert(i) for i in range(450)])
    patches = org.emu.requests(
        method="PATCH", path_prefix="/services/data/v62.0/composite/sobjects/Account/ERP_Id__c"
    )
    assert len(patches) == 3
    by_ext = {r["ERP_Id__c"]: r["Id"] for r in org.emu.all("Account")}
    assert [o.external_id for o in outcomes] == [by_ext[f"C-{i}"] for i in range(450)]


def test_apply_updates_by_id_and_deletes_when_record_is_known(org: Org) -> None:
    """An op keyed by Id updates through Collections; deletes by Id or external id soft-delete."""
    a, b = accounts(org.emu, 2)
    sf = org.connector()
    update = Op("u", "sf", "account", "c0", "Account", "upsert", {"Id": a}, {"Name": "Renamed"}, "t")
    by_id = Op("d1", "sf", "account", "c0", "Account", "delete", {"Id": a}, {}, "t")
    by_ext = Op("d2", "sf", "account", "c1", "Account", "delete", {"ERP_Id__c": "C-1"}, {}, "t")
    assert sf.apply([update])[0].external_id == a
    assert org.emu.get("Account", a)["Name"] == "Renamed"  # type: ignore[index]
    assert org.emu.requests(method="PATCH", path_prefix="/services/data/v62.0/composite/sobjects")[
        -1
    ].path == ("/services/data/v62.0/composite/sobjects")
    outcomes = sf.apply([by_id, by_ext])
    assert [o.external_id for o in outcomes] == [a, b]
    assert org.emu.get("Account", a)["IsDeleted"] and org.emu.get("Account", b)["IsDeleted"]  # type: ignore[index]
    replay = sf.apply([by_id, by_ext])
    assert [o.status for o in replay] == ["applied", "applied"]
    assert {o.detail for o in replay} == {"already deleted"}


def test_apply_lands_one_records_ops_in_queue_order_when_keyed_differently(org: Org) -> None:
    """A record's upsert by external id, then its update by Id: grouping must not swap them."""
    a, b = accounts(org.emu, 2)
    sf = org.connector()
    other = Op("o", "sf", "account", "c0", "Account", "upsert", {"Id": a}, {"Name": "Other"}, "t")
    first = Op("f", "sf", "account", "c1", "Account", "upsert", {"ERP_Id__c": "C-1"}, {"Name": "Old"}, "t")
    then = Op("n", "sf", "account", "c1", "Account", "upsert", {"Id": b}, {"Name": "New"}, "t")
    outcomes = sf.apply([other, first, then])
    assert [o.status for o in outcomes] == ["applied"] * 3
    assert org.emu.get("Account", b)["Name"] == "New"  # type: ignore[index]
    assert org.emu.get("Account", a)["Name"] == "Other"  # type: ignore[index]


def test_apply_returns_retry_when_row_is_locked(org: Org) -> None:
    """UNABLE_TO_LOCK_ROW on one record is a retry outcome for that op only."""
    org.emu.lock_next_rows(1)
    outcomes = org.connector().apply([upsert(0), upsert(1)])
    assert [o.status for o in outcomes] == ["retry", "applied"]
    assert outcomes[0].reason == "UNABLE_TO_LOCK_ROW"


def test_apply_rejects_op_when_key_cannot_address_a_record(org: Org) -> None:
    """An op without a usable key is rejected locally, without an API call."""
    op = Op("k", "sf", "account", "c", "Account", "upsert", {"ERP_Id__c": "a", "Other": "b"}, {}, "t")
    assert org.connector().apply([op])[0].status == "reject"
    assert org.data_requests() == []


# --- failures, auth, budget ----------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503])
def test_calls_raise_retryable_when_server_fails(org: Org, status: int) -> None:
    """5xx on a read or a write batch raises RetryableError (not a per-record outcome)."""
    sf = org.connector()
    org.emu.fail_next(1, status=status)
    with pytest.raises(RetryableError):
        sf.read("Account", None, limit=10)
    org.emu.fail_next(1, status=status)
    with pytest.raises(RetryableError):
        sf.apply([upsert(1)])


@pytest.mark.parametrize("daily", [False, True])
def test_calls_raise_rate_limited_when_request_limit_exceeded(org: Org, daily: bool) -> None:
    """403 REQUEST_LIMIT_EXCEEDED is a rate limit, not an auth failure; usage is kept."""
    sf = org.connector()
    org.emu.throttle_next(1, daily=daily)
    with pytest.raises(RateLimited) as info:
        sf.read("Account", None, limit=10)
    assert not isinstance(info.value, BudgetExhausted) and info.value.retry_after is None


def test_calls_raise_rate_limited_when_daily_limit_is_reached(org: Org) -> None:
    """The emulator's own daily counter answers 403 once spent; Sforce-Limit-Info is recorded."""
    org.emu.daily_limit = 2
    sf = org.connector()
    sf.read("Account", None, limit=10)
    assert sf.api_usage()["server_used"] == 1 and sf.api_usage()["server_max"] == 2
    sf.read("Account", None, limit=10)
    with pytest.raises(RateLimited):
        sf.read("Account", None, limit=10)


def test_calls_refresh_token_once_when_session_expires_mid_run(org: Org) -> None:
    """An expired session costs one 401, one new token and a retry; the call succeeds."""
    accounts(org.emu, 2)
    org.emu.shift_clock(timedelta(seconds=10))
    sf = org.connector()
    sf.read("Account", None, limit=10)
    org.emu.expire_all_tokens()
    assert len(sf.read("Account", None, limit=10).changes) == 2
    assert org.emu.tokens_issued == 2
    assert [r.status for r in org.data_requests()].count(401) == 1


def test_calls_refresh_token_when_session_lifetime_passes(org: Org) -> None:
    """Past the org's session timeout the next call re-authenticates transparently."""
    sf = org.connector()
    sf.read("Account", None, limit=10)
    org.emu.shift_clock(timedelta(hours=3))
    sf.read("Account", None, limit=10)
    assert org.emu.tokens_issued == 2


def test_calls_raise_auth_error_when_refreshed_token_is_refused_too(org: Org) -> None:
    """A second 401 after the one refresh is an AuthError."""
    org.emu.token_lifetime = timedelta(0)
    with pytest.raises(AuthError):
        org.connector().read("Account", None, limit=10)
    assert [r.status for r in org.data_requests()] == [401, 401]


def test_calls_raise_auth_error_without_secret_when_secret_is_bad(org: Org) -> None:
    """A wrong client secret is an AuthError whose message never shows the secret."""
    with pytest.raises(AuthError) as info:
        org.connector(secret="wrong-pass-123").read("Account", None, limit=10)
    assert "wrong-pass-123" not in str(info.value) and "invalid_client" in str(info.value)
    assert org.data_requests() == []


def test_calls_raise_budget_exhausted_before_any_call_when_budget_is_spent(org: Org) -> None:
    """A spent per-run budget refuses the call before it reaches the server."""
    with pytest.raises(BudgetExhausted):
        org.connector(budget=ApiBudget(per_run=0)).read("Account", None, limit=10)
    assert org.emu.requests() == []


def test_calls_raise_budget_exhausted_with_reset_time_when_daily_budget_is_spent(org: Org) -> None:
    """The daily budget counts calls over a rolling day and says when the oldest ages out."""
    now = [T0]
    sf = org.connector(budget=ApiBudget(per_day=2), clock=lambda: now[0])
    sf.read("Account", None, limit=10)
    now[0] = T0 + timedelta(hours=1)
    sf.read("Account", None, limit=10)
    before = len(org.data_requests())
    with pytest.raises(BudgetExhausted) as info:
        sf.read("Account", None, limit=10)
    assert info.value.retry_after == pytest.approx(23 * 3600)
    assert len(org.data_requests()) == before
    assert sf.api_usage()["budget_day_remaining"] == 0 and sf.api_usage()["calls"] == 2
    now[0] = T0 + timedelta(hours=24, seconds=1)
    sf.read("Account", None, limit=10)


def test_jwt_bearer_authenticates_when_assertion_is_signed(org: Org) -> None:
    """The JWT bearer grant (HS256 in the emulator) yields a working session."""
    client = make_client(org.url)
    provider = JwtBearer(
        client,
        "/services/oauth2/token",
        client_id="syncagent",
        username="int@acme.test",
        signer=hs256_signer(Secret("jwt-key")),
    )
    sf = SalesforceConnector("sf", client, auth=BearerAuth(provider), objects=OBJECTS)
    assert isinstance(sf.read("Account", None, limit=10), Batch)
    bad = JwtBearer(
        client,
        "/services/oauth2/token",
        client_id="syncagent",
        username="int@acme.test",
        signer=hs256_signer(Secret("not-the-key")),
    )
    with pytest.raises(AuthError):
        bad.token()


# --- check ----------------------------------------------------------------------------------


def test_check_reports_nothing_when_setup_is_right(org: Org) -> None:
    """Token, API version, fields and external ids all check out."""
    assert org.connector().check() == []


def test_check_reports_problems_when_fields_or_external_id_are_wrong(org: Org) -> None:
    """Missing fields and a non-External-ID key field are named, one problem each."""
    objects = {
        "Account": SfObject("Account", ("Name", "Nope__c"), "Name"),
        "Widget": SfObject("Widget", ("Name",), None),
    }
    problems = org.connector(objects=objects).check()
    messages = [p.message for p in problems]
    assert any("Nope__c" in m for m in messages)
    assert any("Name is not an External ID" in m for m in messages)
    assert any(p.subject.endswith("/Widget") for p in problems)


@pytest.mark.parametrize(
    ("secret", "version", "needle"), [("bad", "v62.0", "token"), ("s3cret", "v30.0", "v30.0")]
)
def test_check_reports_problem_when_auth_or_version_fails(
    org: Org, secret: str, version: str, needle: str
) -> None:
    """Refused credentials and an unoffered API version are problems, not exceptions."""
    problems = org.connector(secret=secret, api_version=version).check()
    assert len(problems) == 1 and needle in problems[0].message


# --- emulator fidelity ----------------------------------------------------------------------


def raw(org: Org) -> tuple[httpx.Client, dict[str, str]]:
    client = httpx.Client(base_url=org.url)
    token = client.post(
        "/services/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": "syncagent", "client_secret": "s3cret"},
    )
    return client, {"Authorization": f"Bearer {token.json()['access_token']}"}


def test_emulator_shapes_match_samples_when_queried(org: Org) -> None:
    """Pages, records, datetimes and limit headers have the documented shapes."""
    accounts(org.emu, 5)
    client, auth = raw(org)
    page = client.get(
        "/services/data/v62.0/queryAll",
        params={"q": "SELECT Id, Name, SystemModstamp FROM Account"},
        headers=auth,
    )
    sample = json.loads((DATA / "query_page.json").read_text())
    body = page.json()
    assert set(body) == set(sample) and set(body["records"][0]) == set(sample["records"][0])
    assert body["nextRecordsUrl"].startswith("/services/data/v62.0/query/01g")
    assert body["records"][0]["SystemModstamp"] == "2024-05-01T12:00:00.000+0000"
    assert page.headers["Sforce-Limit-Info"] == "api-usage=1/100000"
    assert "Wed, 01 May 2024 12:00:00 GMT" in page.headers.get_list("Date")  # the emulator clock's
    nxt = client.get(body["nextRecordsUrl"], headers=auth).json()
    assert nxt["done"] is True and len(nxt["records"]) == 2


def test_emulator_errors_are_json_arrays_when_requests_fail(org: Org) -> None:
    """401/403/400 bodies are arrays of {message, errorCode}; OAuth errors are objects; no Retry-After."""
    client, auth = raw(org)
    samples = json.loads((DATA / "errors.json").read_text())
    expired = client.get("/services/data/v62.0/limits", headers={"Authorization": "Bearer nope"})
    assert expired.status_code == 401 and expired.json() == samples["INVALID_SESSION_ID"]
    org.emu.throttle_next(1, daily=True)
    limited = client.get("/services/data/v62.0/limits", headers=auth)
    assert limited.status_code == 403 and limited.json() == samples["REQUEST_LIMIT_EXCEEDED"]
    assert "Retry-After" not in limited.headers
    quoted = client.get(
        "/services/data/v62.0/query",
        headers=auth,
        params={"q": "SELECT Id FROM Account WHERE SystemModstamp > '2024-05-01T00:00:00Z'"},
    )
    assert quoted.status_code == 400 and quoted.json()[0]["errorCode"] == "INVALID_QUERY_FILTER_OPERATOR"
    oauth = client.post("/services/oauth2/token", data={"grant_type": "password"})
    assert set(oauth.json()) == {"error", "error_description"}


def test_emulator_upsert_results_match_sample_when_some_rows_fail(org: Org) -> None:
    """Collections upsert answers 200 with per-row {id, success, errors, created}."""
    client, auth = raw(org)
    body = {
        "allOrNone": False,
        "records": [
            {"attributes": {"type": "Account"}, "ERP_Id__c": "C-1", "Name": "One"},
            {"attributes": {"type": "Account"}, "ERP_Id__c": "C-2"},
        ],
    }
    response = client.patch(
        "/services/data/v62.0/composite/sobjects/Account/ERP_Id__c", json=body, headers=auth
    )
    sample = json.loads((DATA / "collections_upsert_response.json").read_text())
    results = response.json()
    assert response.status_code == 200
    assert set(results[0]) == set(sample[0]) and set(results[1]) == set(sample[1])
    assert results[1]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    assert set(results[1]["errors"][0]) == set(sample[1]["errors"][0])


def test_emulator_rolls_back_everything_when_all_or_none_fails(org: Org) -> None:
    """allOrNone=true: one bad row rolls back the good ones."""
    client, auth = raw(org)
    body = {
        "allOrNone": True,
        "records": [
            {"attributes": {"type": "Account"}, "ERP_Id__c": "C-1", "Name": "One"},
            {"attributes": {"type": "Account"}, "ERP_Id__c": "C-2"},
        ],
    }
    results = client.patch(
        "/services/data/v62.0/composite/sobjects/Account/ERP_Id__c", json=body, headers=auth
    ).json()
    assert results[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert org.emu.all("Account") == []


def test_emulator_ids_are_18_chars_with_key_prefix_when_inserted(org: Org) -> None:
    """Ids carry the object's key prefix and the case-safe 3-char suffix."""
    account = org.emu.insert("Account", {"Name": "A"})
    opp = org.emu.insert("Opportunity", {"Name": "O", "StageName": "Proposal", "CloseDate": "2024-06-30"})
    assert len(account) == 18 and account.startswith("001") and opp.startswith("006")
    assert account[15:] == "QAA"


def test_emulator_seed_demo_creates_accounts_and_opportunities_when_called() -> None:
    """The demo seed is plain data: three accounts with two opportunities each."""
    emu = SalesforceEmulator()
    emu.seed_demo()
    assert len(emu.all("Account")) == 3 and len(emu.all("Opportunity")) == 6
    assert {o["IsWon"] for o in emu.all("Opportunity")} == {True, False}


def test_emulator_query_options_header_sets_page_size_when_at_least_200() -> None:
    """batchSize below 200 is raised to 200; the configured page size caps it."""
    emu = SalesforceEmulator()
    for i in range(450):
        emu.insert("Account", {"Name": f"A{i}"})
    with EmulatorServer(emu) as server:
        client, auth = raw(Org(emu, server.url))
        for asked, got in (("batchSize=50", 200), ("batchSize=300", 300), (None, 450)):
            headers = dict(auth, **({"Sforce-Query-Options": asked} if asked else {}))
            page = client.get(
                "/services/data/v62.0/query", params={"q": "SELECT Id FROM Account"}, headers=headers
            ).json()
            assert len(page["records"]) == got
            assert parse_qs(urlsplit(page.get("nextRecordsUrl", "/x?")).query) == {}


def test_apply_rejects_duplicate_value_when_unique_field_collides(org: Org) -> None:
    """Moving a record onto another record's unique external id is DUPLICATE_VALUE for that op."""
    a, _ = accounts(org.emu, 2)
    op = Op("u", "sf", "account", "c0", "Account", "upsert", {"Id": a}, {"ERP_Id__c": "C-1"}, "t")
    outcome = org.connector().apply([op])[0]
    assert (outcome.status, outcome.reason, outcome.field_name) == ("reject", "DUPLICATE_VALUE", "ERP_Id__c")


def test_calls_raise_retryable_when_server_is_slower_than_timeout(org: Org) -> None:
    """A response slower than the client timeout is a retryable timeout."""
    client = make_client(org.url, timeout=0.2)
    provider = ClientCredentials(client, "/services/oauth2/token", "syncagent", Secret("s3cret"))
    sf = SalesforceConnector("sf", client, auth=BearerAuth(provider), objects=OBJECTS)
    org.emu.slow_next(1, 0.5)
    with pytest.raises(RetryableError):
        sf.read("Account", None, limit=10)

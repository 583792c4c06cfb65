"""Contract tests: DynamicsConnector against the Dataverse emulator running as a real loopback server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.errors import AuthError, CursorUnavailable, RateLimited, RetryableError
from agent.model import Batch, Change, Cursor, Op, new_trace_id
from connectors.auth import BearerAuth, ClientCredentials, Secret
from connectors.base import Resync, Sink, Source
from connectors.dynamics import DvTable, DynamicsConnector, DynamicsEmulator
from connectors.emulator import EmulatorServer, EmuResponse
from connectors.http import make_client

DATA = Path(__file__).parent.parent / "data" / "dynamics"
ACCOUNTS = DvTable("accounts", "account", "accountid", ("name", "erp_customerid", "revenue"),
                   alternate_key=("erp_customerid",))  # fmt: skip
OPPORTUNITIES = DvTable("opportunities", "opportunity", "opportunityid", ("name", "estimatedvalue"),
                        alternate_key=("erp_projectid",), change_tracking=False)  # fmt: skip
TABLES = {"account": ACCOUNTS, "opportunity": OPPORTUNITIES}

Factory = Callable[..., DynamicsConnector]


@pytest.fixture
def emulator() -> DynamicsEmulator:
    return DynamicsEmulator()


@pytest.fixture
def server(emulator: DynamicsEmulator) -> Iterator[EmulatorServer]:
    with EmulatorServer(emulator) as running:
        yield running


@pytest.fixture
def connect(server: EmulatorServer) -> Iterator[Factory]:
    clients: list[httpx.Client] = []

    def build(**kwargs: Any) -> DynamicsConnector:
        client = make_client(server.url, timeout=5.0)
        clients.append(client)
        tokens = ClientCredentials(client, "/contoso-tenant/oauth2/v2.0/token", "syncagent", Secret("s3cret"),
                                   scope="https://contoso.crm.dynamics.com/.default")  # fmt: skip
        kwargs.setdefault("tables", TABLES)
        connector = DynamicsConnector("dynamics", client, auth=BearerAuth(tokens), **kwargs)
        connector.tokens = tokens  # type: ignore[attr-defined]  # so tests can count fetches
        return connector

    yield build
    for client in clients:
        client.close()


def drain(
    dv: DynamicsConnector, stream: str, cursor: Cursor | None, limit: int = 100
) -> tuple[list[Change], Cursor]:
    """Read until the source says nothing more waits; return every change and the last cursor."""
    changes: list[Change] = []
    for _ in range(50):
        batch = dv.read(stream, cursor, limit=limit)
        changes.extend(batch.changes)
        cursor = batch.next_cursor
        if not batch.more:
            return changes, cursor
    raise AssertionError("the source never finished")


def upsert(key: dict[str, Any], fields: dict[str, Any], entity: str = "account") -> Op:
    return Op(new_trace_id(), "dynamics", entity, "canon-1", entity, "upsert", key, fields, new_trace_id())


def test_dynamics_connector_satisfies_the_protocols_when_built(connect: Factory) -> None:
    """The connector is a Source, a Sink and a Resync."""
    dv = connect()
    assert isinstance(dv, Source) and isinstance(dv, Sink) and isinstance(dv, Resync)
    assert dv.streams() == ["account", "opportunity"]


def test_dynamics_read_returns_every_row_and_a_delta_cursor_when_reading_first(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """The first read returns all rows as 'read' and ends on a delta-token cursor without the host."""
    ids = emulator.seed_demo()["accounts"]
    changes, cursor = drain(connect(), "account", None)
    assert sorted(c.key["accountid"] for c in changes) == sorted(ids)
    assert {c.op for c in changes} == {"read"}
    assert cursor.data["mode"] == "delta" and cursor.data["delta"] and "next" not in cursor.data
    assert "127.0.0.1" not in json.dumps(cursor.data)
    first = next(c for c in changes if c.key["accountid"] == ids[0])
    assert first.fields == {"name": "Acme Consulting", "erp_customerid": "C-1", "revenue": None}
    row = emulator.get("accounts", ids[0])
    assert row is not None and first.position == f"{ids[0]}@{row['versionnumber']}"
    assert first.source_ts == row["modifiedon"]


def test_dynamics_delta_read_returns_updates_then_deletes_when_rows_change(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A delta read returns changed rows as 'update' and removed rows as 'delete', deletes last."""
    ids = emulator.seed_demo()["accounts"]
    dv = connect()
    _, cursor = drain(dv, "account", None)
    emulator.update("accounts", ids[0], {"revenue": Decimal("1250.75")})
    emulator.delete("accounts", ids[1])
    new = emulator.insert("accounts", {"name": "Umbrella", "erp_customerid": "C-9"})
    changes, after = drain(dv, "account", cursor)
    assert [(c.op, c.key["accountid"]) for c in changes] == [
        ("update", ids[0]),
        ("update", new),
        ("delete", ids[1]),
    ]
    assert changes[0].fields["revenue"] == Decimal("1250.75")
    assert changes[2].fields == {} and changes[2].position.startswith(f"{ids[1]}@deleted:")
    assert after.data["delta"] != cursor.data["delta"]
    assert drain(dv, "account", after)[0] == []


def test_dynamics_read_follows_next_links_when_table_exceeds_maxpagesize(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A read follows next links until it has `limit` changes; mid-walk cursors keep only the link's path."""
    ids = [emulator.insert("accounts", {"name": f"A{n}", "erp_customerid": f"C-{n}"}) for n in range(7)]
    dv = connect(page_size=3)
    first = dv.read("account", None, limit=3)
    assert len(first.changes) == 3 and first.more
    assert first.next_cursor.data["next"].startswith("/api/data/v9.2/accounts?")
    changes, cursor = drain(dv, "account", first.next_cursor)
    all_changes = [*first.changes, *changes]
    assert sorted(c.key["accountid"] for c in all_changes) == sorted(ids)
    assert len({c.position for c in all_changes}) == 7
    assert len(emulator.requests(method="GET", path_prefix="/api/data/v9.2/accounts")) == 3
    for rid in ids[:5]:
        emulator.update("accounts", rid, {"telephone1": "555"})
    delta, _ = drain(dv, "account", cursor, limit=2)
    assert [c.key["accountid"] for c in delta] == ids[:5]


def test_dynamics_read_raises_cursor_unavailable_when_delta_token_expired(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """An expired delta token is CursorUnavailable naming a resync; the resync ends on a fresh token."""
    ids = emulator.seed_demo()["accounts"]
    dv = connect()
    _, cursor = drain(dv, "account", None)
    emulator.shift_clock(timedelta(days=8))
    with pytest.raises(CursorUnavailable, match="resync"):
        dv.read("account", cursor, limit=100)
    batches: list[Batch] = list(dv.resync("account", since=None, after_key=None, chunk=2))
    assert [len(b.changes) for b in batches] == [2, 1] and [b.more for b in batches] == [True, False]
    assert sorted(c.key["accountid"] for b in batches for c in b.changes) == sorted(ids)
    assert {c.op for b in batches for c in b.changes} == {"read"}
    fresh = batches[-1].next_cursor
    assert fresh.data["mode"] == "delta" and fresh.data["delta"] != cursor.data["delta"]
    emulator.update("accounts", ids[2], {"name": "Initech GmbH"})
    changes, _ = drain(dv, "account", fresh)
    assert [(c.op, c.fields["name"]) for c in changes] == [("update", "Initech GmbH")]


def test_dynamics_resync_resumes_after_key_when_interrupted(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A resync from after_key reads only the rows after it; a mid-resync cursor continues through read()."""
    ids = sorted(emulator.seed_demo()["accounts"])
    dv = connect()
    batches = list(dv.resync("account", since=None, after_key=ids[0], chunk=1))
    assert [c.key["accountid"] for b in batches for c in b.changes] == ids[1:]
    first = next(iter(dv.resync("account", since=None, after_key=None, chunk=1)))
    rest, cursor = drain(dv, "account", first.next_cursor)
    assert [c.key["accountid"] for c in rest] == ids[1:] and cursor.data["mode"] == "delta"


def test_dynamics_poll_reads_each_tied_row_once_per_walk_when_rows_share_modifiedon(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """modifiedon polling pages ties by (modifiedon, id), with no loss and no repeats inside a walk."""
    stamp = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    ids = [emulator.insert("opportunities", {"name": f"O{n}"}, modifiedon=stamp) for n in range(5)]
    dv = connect(page_size=2)
    first = dv.read("opportunity", None, limit=100)
    assert first.more and first.next_cursor.data["upto"]
    changes, cursor = drain(dv, "opportunity", first.next_cursor)
    walk = [*first.changes, *changes]
    assert [c.key["opportunityid"] for c in walk] == sorted(ids)
    assert cursor.data == {"v": 1, "mode": "modifiedon", "ts": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "id": max(ids)}  # fmt: skip
    again, _ = drain(dv, "opportunity", cursor)  # a new walk re-reads the lookback window
    assert {c.position for c in again} == {c.position for c in walk}
    filters = [
        r.query["$filter"][0] for r in emulator.requests(method="GET", path_prefix="/api/data/v9.2/opp")
    ]
    walk_starts = [f for f in filters if f.startswith("modifiedon ge ")]
    assert len(walk_starts) == 1 and "modifiedon le " in walk_starts[0]


def test_dynamics_poll_stops_at_the_signpost_when_rows_are_stamped_ahead_of_the_server(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A row stamped after the server's Date is not read, and the watermark never passes the signpost."""
    now = datetime.now(UTC).replace(microsecond=0)
    early = emulator.insert("opportunities", {"name": "now"}, modifiedon=now - timedelta(seconds=5))
    ahead = emulator.insert("opportunities", {"name": "ahead"}, modifiedon=now + timedelta(hours=1))
    dv = connect()
    changes, cursor = drain(dv, "opportunity", None)
    assert [c.key["opportunityid"] for c in changes] == [early]
    assert datetime.fromisoformat(cursor.data["ts"]) <= datetime.now(UTC)
    emulator.update("opportunities", ahead, {"name": "landed"}, modifiedon=datetime.now(UTC))
    changes, _ = drain(dv, "opportunity", cursor)
    assert ("update", ahead, "landed") in [(c.op, c.key["opportunityid"], c.fields["name"]) for c in changes]


def test_dynamics_upsert_by_alternate_key_creates_nothing_when_applied_twice(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """Upserting by alternate key twice creates one row and updates it; one request per op."""
    dv = connect()
    op = upsert({"erp_customerid": "C-100"}, {"name": "Contoso", "revenue": Decimal("10.50")})
    first, second = dv.apply([op]), dv.apply([op])
    assert first[0].status == second[0].status == "applied"
    assert first[0].external_id == second[0].external_id
    assert int(second[0].version or 0) > int(first[0].version or 0)
    rows = [r for r in emulator.all("accounts") if r["erp_customerid"] == "C-100"]
    assert len(rows) == 1 and rows[0]["revenue"] == Decimal("10.50")
    assert len(emulator.requests(method="PATCH")) == 2


def test_dynamics_update_rejects_record_deleted_when_the_row_is_gone(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """An update by primary key sends If-Match: * so a deleted row is rejected, not re-created."""
    rid = emulator.insert("accounts", {"name": "Gone", "erp_customerid": "C-5"})
    emulator.delete("accounts", rid)
    [outcome] = connect().apply([upsert({"accountid": rid}, {"name": "Back?"})])
    assert (outcome.status, outcome.reason) == ("reject", "record_deleted")
    assert emulator.get("accounts", rid) is None and emulator.all("accounts") == []


def test_dynamics_apply_rejects_conflict_when_the_etag_is_stale(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A stale @odata.etag makes Dataverse answer 412, which is a 'conflict' reject."""
    rid = emulator.insert("accounts", {"name": "Old", "erp_customerid": "C-6"})
    [outcome] = connect().apply([upsert({"accountid": rid}, {"name": "New", "@odata.etag": 'W/"1"'})])
    assert (outcome.status, outcome.reason) == ("reject", "conflict")
    row = emulator.get("accounts", rid)
    assert row is not None and row["name"] == "Old"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [({"nonexistent": 1}, "0x80060891", "nonexistent"), ({"name": "x" * 161}, "0x80044331", "name")],
)
def test_dynamics_apply_rejects_with_code_and_field_when_dataverse_refuses_a_column(
    connect: Factory, fields: dict[str, Any], code: str, field: str
) -> None:
    """A 400 is a reject carrying Dataverse's error code and the field its message names."""
    [outcome] = connect().apply([upsert({"erp_customerid": "C-7"}, fields)])
    assert (outcome.status, outcome.reason, outcome.field_name) == ("reject", code, field)


def test_dynamics_delete_is_applied_when_the_record_is_already_gone(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """Deleting twice: the second delete's 404 counts as applied."""
    rid = emulator.insert("accounts", {"name": "Doomed", "erp_customerid": "C-8"})
    op = Op(
        new_trace_id(),
        "dynamics",
        "account",
        "c",
        "account",
        "delete",
        {"accountid": rid},
        {},
        new_trace_id(),
    )
    dv = connect()
    assert [o.status for o in dv.apply([op]) + dv.apply([op])] == ["applied", "applied"]
    assert emulator.get("accounts", rid) is None


def test_dynamics_raises_rate_limited_with_the_servers_wait_when_throttled(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """Service protection: 429's Retry-After comes back as RateLimited.retry_after, for reads and writes."""
    emulator.rate_limit, emulator.rate_window = 2, 300.0
    emulator.freeze_clock(datetime.now(UTC))
    dv = connect()
    drain(dv, "account", None)
    dv.check()  # uses up the window
    with pytest.raises(RateLimited) as caught:
        dv.read("account", None, limit=10)
    assert caught.value.retry_after == 300.0
    emulator.rate_limit = None
    body = {"error": {"code": "0x80072322", "message": "slow down"}}
    emulator.inject(EmuResponse(429, body, {"Retry-After": "37"}), method="PATCH")
    with pytest.raises(RateLimited) as caught:
        dv.apply([upsert({"erp_customerid": "C-1"}, {"name": "A"})])
    assert caught.value.retry_after == 37.0


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_dynamics_raises_retryable_when_the_server_fails(
    emulator: DynamicsEmulator, connect: Factory, status: int
) -> None:
    """5xx on a read or a write is retryable for the whole batch, not a record reject."""
    dv = connect()
    emulator.inject(
        EmuResponse(status, {"error": {"code": "", "message": "boom"}}), path_prefix="/api/", count=2
    )
    with pytest.raises(RetryableError) as read_error:
        dv.read("account", None, limit=10)
    with pytest.raises(RetryableError) as write_error:
        dv.apply([upsert({"erp_customerid": "C-1"}, {"name": "A"})])
    assert not isinstance(read_error.value, RateLimited) and not isinstance(write_error.value, RateLimited)


def test_dynamics_refreshes_the_token_once_when_it_expired(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """An expired token answers 401 with WWW-Authenticate; the auth fetches a new one once and retries."""
    emulator.seed_demo()
    dv = connect()
    _, cursor = drain(dv, "account", None)
    emulator.expire_all_tokens()
    emulator.update("accounts", emulator.all("accounts")[0]["accountid"], {"name": "Renamed"})
    changes, _ = drain(dv, "account", cursor)
    assert [c.fields["name"] for c in changes] == ["Renamed"]
    assert dv.tokens.fetches == 2  # type: ignore[attr-defined]
    assert [r.status for r in emulator.requests(path_prefix="/api/")][-2:] == [401, 200]


def test_dynamics_raises_auth_error_when_the_refreshed_token_is_refused_too(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """Two 401s in a row (after the one refresh) are an AuthError, and check() reports it."""
    dv = connect()
    emulator.inject(EmuResponse(401, None, {"WWW-Authenticate": "Bearer"}), path_prefix="/api/", count=4)
    with pytest.raises(AuthError):
        dv.read("account", None, limit=10)
    [problem] = dv.check()
    assert "refused the token" in problem.message


def test_dynamics_quotes_alternate_key_values_when_they_contain_quotes(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A key value with ', /, # and spaces is quoted as an OData literal and round-trips exactly."""
    dv = connect()
    value = "O'Brien & Sons/#1 ?"
    outcomes = dv.apply([upsert({"erp_customerid": value}, {"name": "OB"})]) * 1
    outcomes += dv.apply([upsert({"erp_customerid": value}, {"name": "OB2"})])
    assert outcomes[0].external_id == outcomes[1].external_id
    [row] = emulator.all("accounts")
    assert (row["erp_customerid"], row["name"]) == (value, "OB2")
    assert "erp_customerid='O''Brien" in emulator.requests(method="PATCH")[0].path


def test_dynamics_read_resumes_when_restarted_from_a_stored_cursor(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A cursor stored as JSON and handed to a new connector continues where the old one stopped."""
    ids = emulator.seed_demo()["accounts"]
    _, cursor = drain(connect(), "account", None)
    stored = json.dumps(dict(cursor.data))
    emulator.update("accounts", ids[1], {"name": "Globex SE"})
    changes, _ = drain(connect(), "account", Cursor(json.loads(stored)))
    assert [(c.op, c.key["accountid"], c.fields["name"]) for c in changes] == [
        ("update", ids[1], "Globex SE")
    ]


def test_dynamics_read_parses_the_documented_delta_shape_when_served_a_sample(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """A delta page shaped like the docs' example yields an update (Decimal money) and a delete."""
    sample = json.loads((DATA / "delta_page.json").read_text())
    dv = connect()
    emulator.inject(EmuResponse(200, sample), path_prefix="/api/data/v9.2/accounts")
    batch = dv.read("account", Cursor({"v": 1, "mode": "delta", "delta": "1!01/01/2025 00:00:00"}), limit=10)
    update, delete = batch.changes
    assert (update.op, update.fields["revenue"], update.position) == (
        "update", Decimal("1250000.75"), "3b1e8f0a-5c2d-4e7f-9a10-2b3c4d5e6f70@2207101")  # fmt: skip
    assert (delete.op, delete.key) == ("delete", {"accountid": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"})
    assert batch.next_cursor.data == {"v": 1, "mode": "delta", "delta": "2207118!03/04/2025 11:42:07"}


def test_dynamics_check_reports_setup_problems_when_tracking_is_off_and_key_missing(
    emulator: DynamicsEmulator, connect: Factory
) -> None:
    """check() passes on a good setup and names untracked tables, missing keys and unknown columns."""
    assert connect().check() == []
    emulator.set_change_tracking("accounts", False)
    bad = DvTable("accounts", "account", "accountid", ("name", "nosuchcolumn"), alternate_key=("telephone1",))
    messages = [p.message for p in connect(tables={"account": bad}).check()]
    assert any("change tracking is off" in m for m in messages)
    assert any("no alternate key" in m for m in messages)
    assert any("cannot read the configured columns" in m for m in messages)


def test_dynamics_read_raises_cursor_unavailable_when_cursor_mode_does_not_match_the_table(
    connect: Factory,
) -> None:
    """A delta cursor on a modifiedon table is never silently restarted."""
    with pytest.raises(CursorUnavailable, match="resync"):
        connect().read(
            "opportunity", Cursor({"v": 1, "mode": "delta", "delta": "1!01/01/2025 00:00:00"}), limit=5
        )


@pytest.mark.parametrize(
    ("params", "prefer", "status"),
    [
        ({"$filter": "name eq 'x'"}, "odata.track-changes", 400),
        ({"$top": "1"}, "odata.track-changes", 400),
        (
            {"$filter": "(erp_customerid eq 'C-1' or erp_customerid eq 'C-2') and not (name eq 'Globex')"},
            "",
            200,
        ),
    ],
)
def test_emulator_applies_odata_rules_when_queried_directly(
    emulator: DynamicsEmulator, server: EmulatorServer, params: dict[str, str], prefer: str, status: int
) -> None:
    """The emulator refuses $filter/$top with track-changes and evaluates and/or/not/parentheses."""
    emulator.seed_demo()
    headers = {"Authorization": f"Bearer {emulator.issue_token()}", "Prefer": prefer}
    response = httpx.get(f"{server.url}/api/data/v9.2/accounts", params=params, headers=headers)
    assert response.status_code == status
    if status == 200:
        assert [r["erp_customerid"] for r in response.json()["value"]] == ["C-1"]
    else:
        assert response.json()["error"]["code"].startswith("0x")


def test_emulator_honours_create_only_and_upsert_when_patching(
    emulator: DynamicsEmulator, server: EmulatorServer
) -> None:
    """PATCH without If-Match creates; If-None-Match: * refuses to touch an existing row (412)."""
    headers = {"Authorization": f"Bearer {emulator.issue_token()}"}
    url = f"{server.url}/api/data/v9.2/accounts(erp_customerid='C-42')"
    created = httpx.patch(url, json={"name": "New"}, headers=headers)
    refused = httpx.patch(url, json={"name": "Again"}, headers={**headers, "If-None-Match": "*"})
    assert (created.status_code, refused.status_code) == (204, 412)
    assert refused.json()["error"]["code"] == "0x80040237"
    assert [r["name"] for r in emulator.all("accounts")] == ["New"]


def test_dynamics_package_exports_are_pinned_when_imported() -> None:
    """The package's public names are exactly these."""
    import connectors.dynamics as package

    assert sorted(package.__all__) == ["DvTable", "DynamicsConnector", "DynamicsEmulator", "TableSpec"]

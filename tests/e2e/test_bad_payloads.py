"""Malformed or surprising Salesforce payloads against a real PostgreSQL ERP, through the CLI.

Bad values are put straight into the emulator's store (its data-access API skips the
emulator's own validation), or cut out of its query responses by a hook, as a misbehaving
server would send them. Each bad record must reach the exception queue with its trace id and
the field named, while the good records of the same poll flow to the ERP; nothing crashes,
no log line carries the values, and ``status`` keeps working.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from connectors.emulator import EmulatorServer, EmuRequest, EmuResponse
from connectors.salesforce.emulator import SalesforceEmulator
from tests.erp import add_sf_fields, dsn_parts, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]

MEGABYTE = 1_000_000
_SECOND_PAGE = re.compile(r"/query/01g\w+-2\Z")

Hook = Callable[[EmuRequest, EmuResponse | None], EmuResponse | None]


class HookedSalesforce(SalesforceEmulator):
    """The Salesforce emulator with hooks that see (and may rewrite) every response."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.before: list[Callable[[EmuRequest], None]] = []
        self.after: list[Hook] = []

    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Run the before-hooks, serve the request, then let the after-hooks rewrite the answer."""
        for hook in self.before:
            hook(request)
        response = super().handle(request)
        for after in self.after:
            response = after(request, response)
        return response


def strip_fields(record_ids: dict[str, tuple[str, ...]]) -> Hook:
    """A hook that removes named fields from named records in query pages (fields absent, not null)."""

    def hook(request: EmuRequest, response: EmuResponse | None) -> EmuResponse | None:
        if response is None or "/query" not in request.path or not isinstance(response.body, dict):
            return response
        records = []
        for r in response.body.get("records", []):
            drop = record_ids.get(str(r.get("Id")), ())
            records.append({k: v for k, v in r.items() if k not in drop})
        return EmuResponse(response.status, {**response.body, "records": records}, response.headers)

    return hook


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


class Env:
    def __init__(self, dsn: str, cfg: Path, sf: HookedSalesforce) -> None:
        self.dsn, self.cfg, self.sf = dsn, cfg, sf
        self.stderr: list[str] = []

    def cli(self, *args: str) -> Result:
        res = CliRunner().invoke(cli, ["-c", str(self.cfg), *args])
        crashed = res.exception is not None and not isinstance(res.exception, SystemExit)
        assert not crashed, f"{args} crashed: {res.exception!r}"
        self.stderr.append(res.stderr)
        return Result(res.exit_code, res.stdout, res.stderr)

    def cycle(self, n: int = 1) -> dict[str, Any]:
        """Run ``n`` full cycles, the emulator's clock moving past the connector's safety lag first."""
        out: dict[str, Any] = {}
        for _ in range(n):
            self.sf.shift_clock(timedelta(seconds=3))
            res = self.cli("run", "--once")
            out = json.loads(res.stdout.strip().splitlines()[-1])
        return out

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def erp_names(self) -> set[str]:
        return {r[0] for r in self.sql("SELECT name FROM erp.customers")}

    def exceptions(self) -> list[dict[str, Any]]:
        res = self.cli("exceptions", "list", "--status", "all", "--json")
        assert res.code == 0, res.stdout
        items: list[dict[str, Any]] = json.loads(res.stdout)["items"]
        return items

    def traces_of(self, record_id: str) -> set[str]:
        """Trace ids of every journal entry captured for the CRM record ``record_id``."""
        res = self.cli("journal", "--json", "--limit", "10000", "--source", "crm")
        entries = json.loads(res.stdout)["entries"]
        return {e["trace_id"] for e in entries if e["key"].get("Id") == record_id}

    def parked(self, record_id: str) -> list[dict[str, Any]]:
        """Exception items whose trace id belongs to the CRM record ``record_id``."""
        traces = self.traces_of(record_id)
        return [i for i in self.exceptions() if i["trace_id"] in traces]

    def assert_status_usable(self) -> dict[str, Any]:
        res = self.cli("status", "--json")
        assert res.code in (0, 1), res.stdout
        snap: dict[str, Any] = json.loads(res.stdout)
        assert snap["schema_version"] >= 1 and {s["connector"] for s in snap["streams"]} == {"erp", "crm"}
        return snap

    def assert_nothing_crashed(self) -> None:
        logs = "\n".join(self.stderr)
        assert "Traceback" not in logs and "job_crashed" not in logs, logs[-3000:]


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    sf = HookedSalesforce(page_size=2)
    add_sf_fields(sf)
    try:
        with EmulatorServer(sf) as server:
            e = Env(pg_dsn, sync_config(tmp_path, pg_dsn, server.url), sf)
            init = e.cli("init")
            assert init.code == 0, init.stdout + init.stderr
            yield e
    finally:
        drop_replication_objects(pg_dsn)


def drop_replication_objects(dsn: str) -> None:
    """Drop the slot and origin ``init`` made (named after the database): the cluster has few."""
    name = dsn_parts(dsn)["dbname"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
        conn.execute(
            "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = %s",
            (name,),
        )


def test_payload_bad_values_are_parked_with_trace_and_field_while_good_records_flow(env: Env) -> None:
    good = [env.sf.insert("Account", {"Name": f"Good {n}", "Status__c": "Active"}) for n in range(3)]
    text_in_currency = env.sf.insert("Account", {"Name": "Moneybags", "Credit_Limit__c": "lots of money"})
    unknown_picklist = env.sf.insert("Account", {"Name": "Picky", "Status__c": "Suspended"})
    overflow = env.sf.insert("Account", {"Name": "Overflow", "Credit_Limit__c": 10**40})
    env.cycle(3)

    assert env.erp_names() == {"Good 0", "Good 1", "Good 2"}
    assert {r[0] for r in env.sql("SELECT crm_id FROM erp.customers")} == set(good)
    for record_id, field in (
        (text_in_currency, "credit_limit"),
        (unknown_picklist, "status"),
        (overflow, "credit_limit"),
    ):
        items = env.parked(record_id)
        assert len(items) == 1, (field, env.exceptions())
        item = items[0]
        assert item["field"] == field and item["status"] == "open" and item["trace_id"], item
    logs = "\n".join(env.stderr)
    assert "lots of money" not in logs and "Suspended" not in logs and "1" * 30 not in logs
    snap = env.assert_status_usable()
    assert snap["exceptions"]["open"] == 3
    env.assert_nothing_crashed()


def test_payload_one_megabyte_string_reaches_the_erp_whole_and_stays_out_of_the_logs(env: Env) -> None:
    huge = "x" * MEGABYTE
    big = env.sf.insert("Account", {"Name": huge, "Status__c": "Active"})
    small = env.sf.insert("Account", {"Name": "Small", "Status__c": "Active"})
    env.cycle(3)

    rows = dict(env.sql("SELECT crm_id, length(name) FROM erp.customers"))
    assert rows == {big: MEGABYTE, small: 5}
    assert env.sql("SELECT name = %s FROM erp.customers WHERE crm_id = %s", huge, big) == [(True,)]
    logs = "\n".join(env.stderr)
    assert "x" * 200 not in logs and max(len(line) for line in logs.splitlines()) < 10_000
    assert env.exceptions() == []
    env.assert_status_usable()
    env.assert_nothing_crashed()


def test_payload_record_missing_a_required_field_is_parked_naming_it(env: Env) -> None:
    nameless = env.sf.insert("Account", {"Name": "will be cut out", "Status__c": "Active"})
    fine = env.sf.insert("Account", {"Name": "Complete", "Status__c": "Active"})
    env.sf.after.append(strip_fields({nameless: ("Name",)}))
    env.cycle(3)

    assert dict(env.sql("SELECT crm_id, name FROM erp.customers")) == {fine: "Complete"}
    items = env.parked(nameless)
    assert len(items) == 1 and items[0]["field"] == "name" and items[0]["trace_id"], env.exceptions()
    env.assert_status_usable()
    env.assert_nothing_crashed()


def test_payload_field_missing_from_an_update_leaves_the_erp_value_alone(env: Env) -> None:
    sid = env.sf.insert("Account", {"Name": "Hooli", "Phone": "+1 555 0100", "Status__c": "Active"})
    env.cycle(2)
    assert env.sql("SELECT name, phone FROM erp.customers") == [("Hooli", "+1 555 0100")]

    env.sf.update("Account", sid, {"Name": "Hooli XYZ"})
    env.sf.after.append(strip_fields({sid: ("Phone",)}))
    env.cycle(3)

    # an absent field is unknown, not null: the ERP keeps the phone it has
    assert env.sql("SELECT name, phone FROM erp.customers") == [("Hooli XYZ", "+1 555 0100")]
    env.assert_nothing_crashed()


def test_payload_record_without_its_modstamp_is_parked_and_does_not_stop_the_stream(env: Env) -> None:
    broken = env.sf.insert("Account", {"Name": "No Stamp", "Status__c": "Active"})
    good = [env.sf.insert("Account", {"Name": f"Stamped {n}", "Status__c": "Active"}) for n in range(3)]
    env.sf.after.append(strip_fields({broken: ("SystemModstamp",)}))
    out = env.cycle(2)

    assert "crm" not in out["failures"], out
    assert {r[0] for r in env.sql("SELECT crm_id FROM erp.customers")} == set(good)
    items = [i for i in env.exceptions() if i["field"] == "SystemModstamp"]
    assert len(items) == 1 and items[0]["trace_id"], env.exceptions()
    env.assert_status_usable()
    env.assert_nothing_crashed()


def test_payload_object_in_a_text_field_is_parked_not_written_as_python_repr(env: Env) -> None:
    odd = env.sf.insert("Account", {"Name": {"first": "Ann", "last": "Lee"}, "Status__c": "Active"})
    fine = env.sf.insert("Account", {"Name": "Plain", "Status__c": "Active"})
    env.cycle(3)

    assert dict(env.sql("SELECT crm_id, name FROM erp.customers")) == {fine: "Plain"}
    items = env.parked(odd)
    assert len(items) == 1 and items[0]["field"] == "name", env.exceptions()
    env.assert_nothing_crashed()


def test_payload_records_deleted_between_page_fetches_are_neither_lost_nor_resurrected(env: Env) -> None:
    ids = [env.sf.insert("Account", {"Name": f"Acct {n}", "Status__c": "Active"}) for n in range(7)]
    # pages of two: [0 1] [2 3] [4 5] [6]; while page two is fetched, 2 and 5 are deleted
    vanished, stale = ids[2], ids[5]
    fired: list[str] = []

    def delete_mid_walk(request: EmuRequest) -> None:
        if _SECOND_PAGE.search(request.path) and not fired:
            fired.append(request.path)
            env.sf.delete("Account", vanished)
            env.sf.delete("Account", stale)

    env.sf.before.append(delete_mid_walk)
    # a server that re-reads its rows per page omits the one deleted there
    env.sf.after.append(
        lambda req, resp: strip_record(resp, vanished) if fired and req.path == fired[0] else resp
    )
    env.cycle(4)

    assert fired, "the walk never reached a second page"
    live = {r[0] for r in env.sql("SELECT crm_id FROM erp.customers")}
    assert live == set(ids) - {vanished}, "a record on a later page was lost"
    # the deletes come through on the next polls and are parked (on_delete = exception)
    reasons = {i["reason"]: i for i in env.parked(stale)}
    assert "deleted_in_source" in reasons and reasons["deleted_in_source"]["trace_id"], env.exceptions()
    entries = json.loads(env.cli("journal", "--json", "--limit", "1000").stdout)["entries"]
    deletes = {e["key"]["Id"] for e in entries if e["op"] == "delete"}
    assert deletes == {vanished, stale}
    assert all(e["fate"] for e in entries), "a journal entry was left without a fate"
    env.assert_status_usable()
    env.assert_nothing_crashed()


def strip_record(response: EmuResponse | None, record_id: str) -> EmuResponse | None:
    """Remove one record from a query page."""
    if response is None or not isinstance(response.body, dict):
        return response
    records = [r for r in response.body.get("records", []) if r.get("Id") != record_id]
    return EmuResponse(response.status, {**response.body, "records": records}, response.headers)

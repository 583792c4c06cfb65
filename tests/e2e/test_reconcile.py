"""Reconciliation end to end: real PostgreSQL and the Salesforce emulator, drift made on purpose.

Drift is made where the agent cannot see it: an ERP edit in a session carrying the agent's
own replication origin (capture drops it as an echo), a Salesforce edit whose SystemModstamp
is back-dated behind the poll's look-back, and a Salesforce hard delete (Recycle Bin purged).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.daemon import Runtime, build_runtime, open_config
from agent.logging import LogfmtFormatter
from agent.reconcile import ReconcileReport, reconcile
from connectors.emulator import EmulatorServer
from connectors.postgres.lookup import RowLookup
from connectors.postgres.slot import TableSpec
from connectors.salesforce.emulator import SalesforceEmulator
from state import audit, exceptions, open_state, outbox
from state.db import State
from tests.erp import add_sf_fields, dsn_parts, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]


class Env:
    def __init__(self, dsn: str, cfg: Path, sf: SalesforceEmulator) -> None:
        self.dsn, self.cfg, self.sf = dsn, cfg, sf
        self.origin = dsn_parts(dsn)["dbname"]

    def cycle(self, n: int = 1) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for _ in range(n):
            self.sf.shift_clock(timedelta(seconds=3))
            res = CliRunner().invoke(cli, ["-c", str(self.cfg), "run", "--once"], catch_exceptions=False)
            out = json.loads(res.stdout.strip().splitlines()[-1])
            assert res.exit_code == 0, out
        return out

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args or None)
            return cur.fetchall() if cur.description else []

    def sql_unseen(self, query: str, *args: object) -> None:
        """Run ``query`` in a session with the agent's replication origin: capture drops it as an echo."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_replication_origin_session_setup(%s)", (self.origin,))
            conn.execute(query, args or None)
            conn.execute("SELECT pg_replication_origin_session_reset()")

    def sf_unseen(self, obj: str, record_id: str, fields: dict[str, Any]) -> None:
        """Change a Salesforce record with a SystemModstamp far behind the poll's look-back."""
        self.sf.update(obj, record_id, fields, at=self.sf.now() - timedelta(hours=1))

    @contextmanager
    def agent(self, *, readonly: bool = False) -> Iterator[tuple[Runtime, State]]:
        cfg = open_config(self.cfg)
        rt = build_runtime(cfg)
        st = open_state(cfg.agent.state_path, readonly=readonly)
        try:
            yield rt, st
        finally:
            st.close()
            rt.close()

    def reconcile(self, entity: str = "customer", **kw: Any) -> ReconcileReport:
        with self.agent(readonly=not kw.get("repair") and not kw.get("open_exceptions")) as (rt, st):
            return reconcile(rt, st, entity, **kw)

    def account(self, sid: str) -> dict[str, Any]:
        record = self.sf.get("Account", sid)
        assert record is not None
        return record

    def writes(self) -> int:
        return len([r for r in self.sf.requests() if "/composite/sobjects" in r.path])


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    sf = SalesforceEmulator()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        e = Env(pg_dsn, sync_config(tmp_path, pg_dsn, server.url), sf)
        assert CliRunner().invoke(cli, ["-c", str(e.cfg), "init"]).exit_code == 0
        yield e


def _synced_customer(env: Env) -> str:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name, phone, credit_limit, status)"
        " VALUES ('C-1', 'Acme', '+49 30 1', 1000.50, 'hold')"
    )
    env.cycle(2)
    (account,) = env.sf.all("Account")
    return str(account["Id"])


def _state_untouched(env: Env) -> None:
    with env.agent(readonly=True) as (_rt, st):
        assert outbox.depth(st) == {}
        assert exceptions.list_items(st, status=None) == []
        assert [r for r in audit.list_records(st) if r.action.startswith("reconcile")] == []


def test_reconcile_finds_nothing_when_a_clean_sync_left_both_sides_in_step(env: Env) -> None:
    _synced_customer(env)
    report = env.reconcile()
    assert report.ok and report.records == 1 and report.compared == 1 and report.in_step == 1
    assert report.systems == ("erp", "crm") and report.skipped_systems == {}
    assert report.unreadable == () and report.drifts == ()


def test_reconcile_reports_drift_by_field_and_owner_when_edits_bypassed_the_agent(env: Env) -> None:
    sid = _synced_customer(env)
    env.sql_unseen("UPDATE erp.customers SET credit_limit = 2500.00")
    env.sf_unseen("Account", sid, {"Name": "Acme Renamed"})
    env.cycle()
    assert env.account(sid)["Credit_Limit__c"] == Decimal("1000.5"), "the agent saw the ERP edit"
    assert env.sql("SELECT name FROM erp.customers") == [("Acme",)], "the agent saw the Salesforce edit"
    # The CLI's logging setup replaces the root handlers (caplog's too): listen on our logger.
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(LogfmtFormatter(timestamps=False))
    log = logging.getLogger("agent.reconcile")
    log.addHandler(handler)
    try:
        report = env.reconcile()
    finally:
        log.removeHandler(handler)
    assert not report.ok and report.drifted_records == 1
    assert {(c.field, c.owner, c.drifted, c.repaired) for c in report.by_field} == {
        ("credit_limit", "erp", 1, 0),
        ("name", "crm", 1, 0),
    }
    drifts = {d.field: d for d in report.drifts}
    assert drifts["credit_limit"].values == {"erp": "2500", "crm": "1000.5"}
    assert drifts["credit_limit"].winner == "erp" and drifts["credit_limit"].targets == ("crm",)
    assert drifts["name"].present == {"erp": True, "crm": True} and drifts["name"].status == "reported"
    assert report.as_dict(values=False)["drifts"][0].get("values") is None
    logged = buf.getvalue()
    assert "reconcile_drift" in logged and "field=credit_limit" in logged and "owner=erp" in logged
    assert "2500" not in logged and "Renamed" not in logged, "a field value reached the log"
    _state_untouched(env)


def test_reconcile_repair_pushes_the_owners_values_and_one_delivery_cycle_fixes_the_drift(env: Env) -> None:
    sid = _synced_customer(env)
    env.sql_unseen("UPDATE erp.customers SET credit_limit = 2500.00")
    env.sf_unseen("Account", sid, {"Name": "Acme Renamed"})
    report = env.reconcile(repair=True)
    assert report.ops_queued == 2 and {d.status for d in report.drifts} == {"repaired"}
    with env.agent(readonly=True) as (_rt, st):
        rows = audit.list_records(st, action="reconcile_repaired")
    assert {(r.detail["field"], r.detail["owner"], r.detail["target"]) for r in rows} == {
        ("credit_limit", "erp", "crm"),
        ("name", "crm", "erp"),
    }
    assert all(r.trace_id and r.detail["run"] == report.run_id for r in rows)
    env.cycle()
    assert env.sql("SELECT name, credit_limit FROM erp.customers") == [("Acme Renamed", Decimal("2500.00"))]
    assert env.account(sid)["Credit_Limit__c"] == Decimal("2500")
    assert env.reconcile().ok
    writes, xmin = env.writes(), env.sql("SELECT xmin::text FROM erp.customers")
    env.cycle(2)
    assert env.writes() == writes and env.sql("SELECT xmin::text FROM erp.customers") == xmin, "ping-pong"


def test_reconcile_repair_queues_nothing_again_while_its_ops_are_in_flight(env: Env) -> None:
    sid = _synced_customer(env)
    env.sf_unseen("Account", sid, {"Name": "Acme Renamed"})
    first = env.reconcile(repair=True)
    second = env.reconcile(repair=True)
    assert first.ops_queued == 1 and second.ops_queued == 0
    assert [(d.field, d.status) for d in second.drifts] == [("name", "in_flight")]
    assert [(d.field, d.status) for d in env.reconcile().drifts] == [("name", "in_flight")]
    with env.agent(readonly=True) as (_rt, st):
        assert outbox.depth(st)["erp"].pending == 1


class _ChangesWhileRead:
    """A connector that, right after answering a read, lets the ERP change and the agent sync it."""

    def __init__(self, inner: Any, env: Env) -> None:
        self.inner, self.env = inner, env

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        got: dict[str, dict[str, Any] | None] = self.inner.fetch(object_name, ids)
        self.env.sql("UPDATE erp.customers SET credit_limit = 3000")
        self.env.cycle()
        return got


def test_reconcile_repair_leaves_a_field_alone_when_the_agent_synced_it_after_the_read(env: Env) -> None:
    sid = _synced_customer(env)
    env.sql_unseen("UPDATE erp.customers SET credit_limit = 2500.00")
    with env.agent() as (rt, st):
        sources: dict[str, Any] = {**rt.sources, "crm": _ChangesWhileRead(rt.sources["crm"], env)}
        racing = replace(rt, sources=sources)
        report = reconcile(racing, st, "customer", repair=True)
    assert [(d.field, d.values["erp"], d.status) for d in report.drifts] == [
        ("credit_limit", "2500", "in_flight")
    ]
    assert report.ops_queued == 0
    env.cycle()
    assert env.account(sid)["Credit_Limit__c"] == Decimal("3000"), "the older value read overtook the newer"
    assert env.reconcile().ok


def test_reconcile_reports_the_drift_the_erp_default_leaves_on_a_contract_created_from_salesforce(
    env: Env,
) -> None:
    sid = _synced_customer(env)
    env.sf.insert(
        "Opportunity",
        {
            "Name": "Phase 1",
            "AccountId": sid,
            "StageName": "Proposal",
            "Amount": Decimal("48000.00"),
            "CloseDate": "2025-06-30",
        },
    )
    env.cycle(2)
    assert env.sql("SELECT title, value, signed_on::text FROM erp.contracts") == [
        ("Phase 1", Decimal("48000.00"), "2025-06-30")
    ]
    report = env.reconcile("contract")
    # Reference, decimal and date compare equal across the systems; the ERP's column default
    # for its own field was written in the agent's session, so it never reached Salesforce.
    assert report.compared == 1 and report.unreadable == ()
    assert [(d.field, d.owner, d.values) for d in report.drifts] == [
        ("delivery_status", "erp", {"erp": "not_started", "crm": None})
    ]
    assert env.reconcile("contract", repair=True).ops_queued == 1
    env.cycle()
    assert env.reconcile("contract").ok


@pytest.mark.parametrize("gone", ["crm", "erp"])
def test_reconcile_reports_a_hard_delete_as_missing_and_opens_one_exception_item(env: Env, gone: str) -> None:
    sid = _synced_customer(env)
    if gone == "crm":
        env.sf.delete("Account", sid, at=env.sf.now() - timedelta(hours=1))
        env.sf.purge_deleted()
    else:
        env.sql_unseen("DELETE FROM erp.customers")
    env.cycle()
    report = env.reconcile()
    assert report.missing_by_system == {gone: 1} and report.compared == 0 and not report.ok
    (m,) = report.missing
    assert m.system == gone and m.present_in == (("erp",) if gone == "crm" else ("crm",))
    assert m.exception_id is None
    _state_untouched(env)
    first = env.reconcile(repair=True)
    again = env.reconcile(open_exceptions=True)
    assert first.missing[0].exception_id == again.missing[0].exception_id is not None
    with env.agent(readonly=True) as (_rt, st):
        (item,) = exceptions.list_items(st)
        assert outbox.depth(st) == {}
    assert (item.kind, item.reason, item.attempts) == ("reconcile", f"missing_in_{gone}", 2)
    assert item.record == {"object": m.object_name, "key": {"Id" if gone == "crm" else "id": m.external_id}}
    assert len(env.sql("SELECT id FROM erp.customers")) == (1 if gone == "crm" else 0)
    assert len(env.sf.all("Account")) == (0 if gone == "crm" else 1), "reconcile deleted something"


def test_reconcile_pages_through_the_cross_reference_and_reports_progress(env: Env) -> None:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name) SELECT 'C-' || g, 'N' || g FROM generate_series(1, 25) g"
    )
    env.cycle(2)
    target = env.sf.all("Account")[17]
    env.sf_unseen("Account", target["Id"], {"AccountNumber": "WRONG"})
    seen: list[tuple[int, int]] = []
    report = env.reconcile(page_size=10, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(10, 25), (20, 25), (25, 25)]
    assert report.records == 25 and report.in_step == 24
    assert [(d.field, d.members["crm"], d.winner) for d in report.drifts] == [
        ("customer_no", target["Id"], "erp")
    ]


def test_salesforce_fetch_reads_200_ids_a_query_and_answers_none_for_gone_records(env: Env) -> None:
    ids = [env.sf.insert("Account", {"Name": f"A{n}", "Phone": str(n)}) for n in range(450)]
    env.sf.delete("Account", ids[3])
    with env.agent() as (rt, _st):
        crm = rt.sources["crm"]
        before = len([r for r in env.sf.requests() if "/query" in r.path])
        got = crm.fetch("Account", [*ids, "001000000000000AAA"])  # type: ignore[attr-defined]
        queries = len([r for r in env.sf.requests() if "/query" in r.path]) - before
    assert queries == 3
    assert got[ids[0]] is not None and got[ids[0]]["Name"] == "A0" and got[ids[0]]["Phone"] == "0"
    assert "attributes" not in got[ids[0]]
    assert got[ids[3]] is None and got["001000000000000AAA"] is None
    assert sum(1 for v in got.values() if v is not None) == 449


def test_postgres_fetch_returns_rows_as_capture_converts_them_and_applies_the_row_filter(env: Env) -> None:
    env.sql(
        "INSERT INTO erp.customers (customer_no, name, credit_limit, status) VALUES"
        " ('C-1', 'Kept', 10.50, 'active'), ('C-2', 'Archived', NULL, 'archived')"
    )
    with env.agent() as (rt, _st):
        got = rt.sources["erp"].fetch("erp.customers", ["1", "2", "999"])  # type: ignore[attr-defined]
    assert got["999"] is None
    assert got["1"] is not None and got["1"]["credit_limit"] == Decimal("10.50") and got["1"]["id"] == 1
    assert got["1"]["updated_at"].tzinfo is not None
    connect = lambda: psycopg.connect(env.dsn)  # noqa: E731
    lookup = RowLookup(connect, [TableSpec("erp", "customers", row_filter="status <> 'archived'")])
    try:
        filtered = lookup.fetch("erp.customers", ["1", "2"])
    finally:
        lookup.close()
    assert filtered["1"] is not None and filtered["2"] is None


def test_reconcile_cli_reports_drift_as_json_and_exits_1_until_repaired(env: Env) -> None:
    """`syncagent reconcile customer` is read-only and exits 1 on drift; --repair queues the fix."""
    _synced_customer(env)

    def run(*args: str) -> tuple[int, dict[str, Any]]:
        res = CliRunner().invoke(cli, ["-c", str(env.cfg), "reconcile", "customer", "--json", *args])
        return res.exit_code, json.loads(res.stdout)

    code, body = run()
    assert code == 0 and body["ok"] is True
    env.sql_unseen("UPDATE erp.customers SET credit_limit = 2500.00")
    code, body = run()
    assert code == 1 and body["ok"] is False
    assert [f["field"] for f in body["report"]["by_field"]] == ["credit_limit"]
    code, body = run("--repair")
    assert code == 0
    env.cycle()
    assert run()[0] == 0

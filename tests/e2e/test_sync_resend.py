"""A write whose answer was lost is checked against the target before it is sent again.

ERP (real PostgreSQL) -> Salesforce (its emulator, a real server): the emulator applies the
write and closes the connection without answering; a CRM user then edits the record; the
next delivery must not overwrite that edit with the agent's older value.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.config import load_config
from agent.daemon import build_runtime
from agent.pipeline import capture, deliver, resolve_pending
from agent.reconcile import lookup_for
from connectors.emulator import EmulatorServer
from connectors.salesforce.emulator import SalesforceEmulator
from state import open_state, outbox
from tests.erp import add_sf_fields, load_erp, sync_config

pytestmark = [pytest.mark.pg, pytest.mark.e2e]

WRITES = "/services/data/"


class Env:
    def __init__(self, dsn: str, cfg: Path, sf: SalesforceEmulator) -> None:
        self.dsn, self.cfg, self.sf = dsn, cfg, sf

    def run_once(self) -> int:
        self.sf.shift_clock(timedelta(seconds=3))
        return (
            CliRunner().invoke(cli, ["-c", str(self.cfg), "run", "--once"], catch_exceptions=False).exit_code
        )

    def sql(self, query: str) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else []

    def deliver_crm(self) -> tuple[int, int]:
        """One delivery to the CRM, nothing captured first: the resend races the user's edit."""
        config = load_config(self.cfg)
        runtime = build_runtime(config)
        st = open_state(config.agent.state_path)
        try:
            r = deliver(
                runtime.sinks["crm"],
                st,
                runtime.resolver,
                policy=runtime.policy,
                lookup=lookup_for(runtime, "crm"),
            )
            return r.applied, r.retried
        finally:
            st.close()
            runtime.close()

    def capture_crm(self) -> None:
        """Read the CRM's Accounts and resolve them, delivering nothing."""
        self.sf.shift_clock(timedelta(seconds=3))
        config = load_config(self.cfg)
        runtime = build_runtime(config)
        st = open_state(config.agent.state_path)
        try:
            capture(runtime.sources["crm"], st, "Account")
            resolve_pending(st, runtime.resolver)
        finally:
            st.close()
            runtime.close()

    def pending_crm(self) -> list[bool]:
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            return [o.in_doubt for o in outbox.pending_for(st, "customer", self._cid(st))]
        finally:
            st.close()

    def crm_links(self) -> int:
        st = open_state(load_config(self.cfg).agent.state_path, readonly=True)
        try:
            return int(st.conn.execute("SELECT count(*) FROM xref WHERE system = 'crm'").fetchone()[0])
        finally:
            st.close()

    def _cid(self, st) -> str:  # type: ignore[no-untyped-def]
        row = st.conn.execute("SELECT canonical_id FROM xref WHERE system = 'erp'").fetchone()
        return str(row[0])


def _start(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crm_timeout: float | None
) -> Iterator[Env]:
    monkeypatch.setenv("SF_CLIENT_ID", "syncagent")
    monkeypatch.setenv("SF_CLIENT_SECRET", "s3cret")
    load_erp(pg_dsn)
    sf = SalesforceEmulator()
    add_sf_fields(sf)
    with EmulatorServer(sf) as server:
        cfg = sync_config(tmp_path, pg_dsn, server.url)
        if crm_timeout is not None:
            text = cfg.read_text().replace(
                "lookback_seconds = 5\n", f"lookback_seconds = 5\ntimeout_seconds = {crm_timeout}\n", 1
            )
            cfg.write_text(text)
        e = Env(pg_dsn, cfg, sf)
        assert CliRunner().invoke(cli, ["-c", str(e.cfg), "init"]).exit_code == 0
        e.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-1', 'Acme', '111')")
        for _ in range(3):
            assert e.run_once() == 0
        yield e


@pytest.fixture
def env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    yield from _start(pg_dsn, tmp_path, monkeypatch, None)


@pytest.fixture
def impatient_env(pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    yield from _start(pg_dsn, tmp_path, monkeypatch, 0.5)


def _lose_next_write_reply(sf: SalesforceEmulator) -> None:
    sf.inject(lose_reply=True, path_prefix=WRITES + "v", method="PATCH")


def test_resend_keeps_a_crm_edit_made_after_a_write_whose_answer_was_lost(env: Env) -> None:
    [acct] = env.sf.all("Account")
    assert acct["Phone"] == "111"
    env.sql("UPDATE erp.customers SET phone = '222'")
    _lose_next_write_reply(env.sf)
    env.run_once()  # captured, resolved, sent: Salesforce took it, the agent never heard back
    assert env.sf.get("Account", acct["Id"])["Phone"] == "222"
    assert env.pending_crm() == [True], "the unanswered op must stay pending, in doubt"
    env.sf.update("Account", acct["Id"], {"Phone": "333"})  # a user, after the lost answer
    applied, _ = env.deliver_crm()
    assert applied == 1 and env.pending_crm() == []
    assert env.sf.get("Account", acct["Id"])["Phone"] == "333", "the resend overwrote the user's edit"
    for _ in range(3):
        env.run_once()
    assert env.sql("SELECT phone FROM erp.customers") == [("333",)]
    assert env.sf.get("Account", acct["Id"])["Phone"] == "333"


def test_resend_sends_again_when_the_lost_write_had_not_landed(env: Env) -> None:
    [acct] = env.sf.all("Account")
    env.sql("UPDATE erp.customers SET phone = '222'")
    env.sf.inject(drop=True, path_prefix=WRITES + "v", method="PATCH")  # closed before it was served
    env.run_once()
    assert env.sf.get("Account", acct["Id"])["Phone"] == "111"
    assert env.pending_crm() == [True]
    before = len(env.sf.requests())
    applied, _ = env.deliver_crm()
    assert applied == 1 and env.sf.get("Account", acct["Id"])["Phone"] == "222"
    calls = [(r.method, r.path.rsplit("/", 1)[-1]) for r in env.sf.requests()[before:]]
    assert calls[-2:] == [("GET", "query"), ("PATCH", "sobjects")], calls  # read first, then the write


def test_resend_answers_without_a_call_when_the_lost_write_had_landed_and_nothing_changed(env: Env) -> None:
    [acct] = env.sf.all("Account")
    env.sql("UPDATE erp.customers SET phone = '222'")
    _lose_next_write_reply(env.sf)
    env.run_once()
    before = [r for r in env.sf.requests() if r.method == "PATCH"]
    applied, _ = env.deliver_crm()
    after = [r for r in env.sf.requests() if r.method == "PATCH"]
    assert applied == 1 and len(after) == len(before), "a write that had landed was sent again"
    assert env.sf.get("Account", acct["Id"])["Phone"] == "222" and env.pending_crm() == []


def test_resend_of_a_first_copy_finds_the_record_by_external_id_and_keeps_the_users_edit(env: Env) -> None:
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-2', 'Globex', '555')")
    _lose_next_write_reply(env.sf)
    # Salesforce capture fails this cycle, so the create's echo cannot link it either.
    env.sf.inject(drop=True, count=50, path_prefix=WRITES + "v62.0/queryAll")
    env.run_once()  # the create landed in Salesforce; its answer (the new Id) never arrived
    env.sf.clear_faults()
    assert env.crm_links() == 1, "only the first customer is linked in the CRM"
    [made] = [a for a in env.sf.all("Account") if a["AccountNumber"] == "C-2"]
    env.sf.update("Account", made["Id"], {"Name": "Globex Worldwide"})
    writes = [r for r in env.sf.requests() if r.method == "PATCH"]
    applied, _ = env.deliver_crm()
    assert applied >= 1
    assert [r for r in env.sf.requests() if r.method == "PATCH"] == writes, "the first copy was sent again"
    assert env.sf.get("Account", made["Id"])["Name"] == "Globex Worldwide"
    for _ in range(3):
        env.run_once()
    assert [a["Id"] for a in env.sf.all("Account") if a["AccountNumber"] == "C-2"] == [made["Id"]]
    assert env.sql("SELECT name, crm_id FROM erp.customers WHERE customer_no = 'C-2'") == [
        ("Globex Worldwide", made["Id"])
    ]


def test_resend_of_two_unanswered_ops_of_one_record_sends_both_in_order(env: Env) -> None:
    [acct] = env.sf.all("Account")
    env.sql("UPDATE erp.customers SET phone = '222'")
    env.sql("UPDATE erp.customers SET phone = '333'")
    env.sf.inject(drop=True, count=5, path_prefix=WRITES + "v", method="PATCH")  # never served
    env.run_once()
    env.sf.clear_faults()
    assert env.pending_crm() == [True, True]
    applied, _ = env.deliver_crm()
    assert applied == 2 and env.pending_crm() == []
    assert env.sf.get("Account", acct["Id"])["Phone"] == "333", "the later op was taken for a newer edit"


def test_resend_of_an_update_queued_behind_an_unanswered_first_copy_still_sends_it(env: Env) -> None:
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-3', 'Initech', '700')")
    env.sf.inject(lose_reply=True, count=5, path_prefix=WRITES + "v", method="PATCH")
    env.sf.inject(drop=True, count=50, path_prefix=WRITES + "v62.0/queryAll")
    env.run_once()  # the create lands, unanswered; nothing links it
    env.sql("UPDATE erp.customers SET phone = '701' WHERE customer_no = 'C-3'")
    env.run_once()  # the update is queued behind it, keyed by external id too
    env.sf.clear_faults()
    [made] = [a for a in env.sf.all("Account") if a["AccountNumber"] == "C-3"]
    applied, _ = env.deliver_crm()
    assert applied >= 2
    assert env.sf.get("Account", made["Id"])["Phone"] == "701", "the follow-up was taken for a first copy"


def test_an_unanswered_attempt_landing_after_a_newer_write_is_undone_when_capture_sees_it(
    impatient_env: Env,
) -> None:
    env = impatient_env
    [acct] = env.sf.all("Account")
    env.sql("UPDATE erp.customers SET phone = '222'")
    env.sf.inject(delay=2.0, path_prefix=WRITES + "v", method="PATCH")  # served after the client gave up
    env.run_once()
    assert env.pending_crm() == [True]
    env.sql("UPDATE erp.customers SET phone = '333'")
    env.run_once()  # 222 resent after a read, then 333: both answered
    assert env.sf.get("Account", acct["Id"])["Phone"] == "333"
    deadline = time.monotonic() + 5
    while env.sf.get("Account", acct["Id"])["Phone"] != "222" and time.monotonic() < deadline:
        time.sleep(0.05)  # the first attempt, still being served, lands now
    assert env.sf.get("Account", acct["Id"])["Phone"] == "222"
    for _ in range(3):
        env.run_once()
    assert env.sf.get("Account", acct["Id"])["Phone"] == "333", "the late attempt rolled the CRM back"
    assert env.sql("SELECT phone FROM erp.customers") == [("333",)]


def test_resend_of_a_first_copy_keeps_a_users_edit_when_its_echo_already_linked_the_record(env: Env) -> None:
    """The create landed unanswered; capture linked the new Account by its ERP id; then a user renamed it."""
    env.sql("INSERT INTO erp.customers (customer_no, name, phone) VALUES ('C-4', 'Umbrella', '900')")
    _lose_next_write_reply(env.sf)
    env.sf.inject(drop=True, count=50, path_prefix=WRITES + "v62.0/queryAll")
    env.run_once()
    env.sf.clear_faults()
    env.capture_crm()  # capture reads the new Account and links it; the create is still unanswered
    [made] = [a for a in env.sf.all("Account") if a["AccountNumber"] == "C-4"]
    assert env.crm_links() == 2
    env.sf.update("Account", made["Id"], {"Name": "Umbrella Corp"})
    env.deliver_crm()
    assert env.sf.get("Account", made["Id"])["Name"] == "Umbrella Corp", "the replayed create renamed it back"
